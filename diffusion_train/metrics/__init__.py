"""Evaluation metrics: Fréchet distances over feature extractors (Inception-v3 FID, the Fashion-MNIST
feature net's FD-FMNIST), reference statistics with provenance, class accuracy."""
