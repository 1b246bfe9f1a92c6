"""Tiny backbones, inputs and checks shared by the speed-option tests (test_speed.py, test_speed_kernels.py).

Parameters are drawn from N(0, 0.05) so that the zero-initialised layers (adaLN-Zero, output layers) do not
hide differences; compiled code runs on the ``aot_eager`` backend (no inductor C++ builds).
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models import DiT, UNet

TIGHT = dict(rtol=1e-5, atol=1e-6)


def randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, std=0.05)
    return model


def tiny_dit(depth: int = 3, hidden_size: int = 64, num_heads: int = 4, **kw) -> DiT:
    return randomised(DiT(input_size=8, in_channels=3, size=None, hidden_size=hidden_size, depth=depth,
                          num_heads=num_heads, patch_size=2, cond_dim=8, **kw))


def tiny_unet(**kw) -> UNet:
    return randomised(UNet(input_size=16, in_channels=3, model_channels=32, channel_mult=(1, 2),
                           attention_resolutions=(8,), **kw))


def dit_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 1000,
            Cond(vector=torch.randn(2, 8, generator=g)))


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000, None


def run(net, model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and parameter gradients of one forward/backward pass of ``net`` (``model``'s parameters)."""
    model.zero_grad(set_to_none=True)
    out = net(*inputs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, **tol) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, **(tol or TIGHT))
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **(tol or TIGHT), msg=name)


def counter() -> CompileCounterWithBackend:
    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


class ConvNet(nn.Module):
    """A backbone without repeated blocks (no nn.ModuleList)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, cond=None):
        return self.conv(x)
