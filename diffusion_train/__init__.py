"""diffusion_train: config-driven diffusion model training for scaling experiments."""

__version__ = "0.1.0"
