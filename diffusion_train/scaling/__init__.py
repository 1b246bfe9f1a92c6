"""Scaling studies: FLOPs accounting (``flops``)."""

from diffusion_train.scaling.flops import (
    TRAINING_FLOPS_PER_MAC,
    counted_macs,
    dit_macs,
    flop_counter_macs,
    forward_macs,
    mmdit_macs,
    peak_flops,
    training_flops_per_image,
)

__all__ = ["TRAINING_FLOPS_PER_MAC", "counted_macs", "dit_macs", "flop_counter_macs", "forward_macs", "mmdit_macs",
           "peak_flops", "training_flops_per_image"]
