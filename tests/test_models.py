"""Tests for the DiT and U-Net backbones (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models import DiT, MMDiT, UNet
from diffusion_train.models.dit import DIT_SIZES, grid_pos_embed, unpatchify
from diffusion_train.models.layers import Attention, sincos_pos_embed_2d, timestep_embedding


def tiny_dit(**kw) -> DiT:
    cfg = dict(input_size=8, in_channels=3, size=None, hidden_size=32, depth=2, num_heads=4)
    return DiT(**{**cfg, **kw})


def tiny_unet(**kw) -> UNet:
    cfg = dict(input_size=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_heads=2)
    return UNet(**{**cfg, **kw})


def perturb(model: nn.Module) -> nn.Module:
    """Move every parameter away from its (possibly zero) initialisation."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(batch: int = 2, channels: int = 3, size: int = 8, cond_dim: int = 0):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    t = torch.rand(batch) * 1000
    cond = Cond(vector=torch.randn(batch, cond_dim)) if cond_dim else None
    return x, t, cond


def tiny_mmdit(**kw) -> MMDiT:
    cfg = dict(input_size=8, in_channels=3, depth=2, hidden_size=32, num_heads=4)
    return MMDiT(**{**cfg, **kw})


FACTORIES = {"dit": tiny_dit, "unet": tiny_unet, "mmdit": tiny_mmdit}
CONFIGS = [
    dict(),
    dict(out_channels=6),
    dict(cond_dim=5),
    dict(cond_dim=5, out_channels=1),
]


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_output_shape_and_zero_init(name, cfg):
    model = FACTORIES[name](**cfg)
    x, t, cond = inputs(cond_dim=cfg.get("cond_dim", 0))
    out = model(x, t, cond)
    assert out.shape == (2, cfg.get("out_channels", 3), 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_every_residual_block_starts_as_the_identity():
    """adaLN-Zero in the transformers and the zero-initialised last convolution or projection of every U-Net
    block: each residual block of a fresh model returns its input (a ResBlock its skip path), so the zero output
    of a fresh model is not the final layer's doing alone."""
    from diffusion_train.models.unet import AttentionBlock, ResBlock

    torch.manual_seed(0)
    dit, mmdit = tiny_dit(cond_dim=5), tiny_mmdit(cond_dim=5)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in dit.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    for block in mmdit.blocks:
        torch.testing.assert_close(block(x, None, c, None)[0], x, rtol=0, atol=0)
    unet = tiny_unet(cond_dim=5)
    seen = {ResBlock: 0, AttentionBlock: 0}
    for block in unet.modules():
        if isinstance(block, ResBlock):
            h = torch.randn(2, block.conv1.in_channels, 4, 4)
            torch.testing.assert_close(block(h, torch.randn(2, block.emb_proj[1].in_features)), block.skip(h),
                                       rtol=0, atol=0)
        elif isinstance(block, AttentionBlock):
            h = torch.randn(2, block.attn.qkv.in_features, 4, 4)
            torch.testing.assert_close(block(h), h, rtol=0, atol=0)
        else:
            continue
        seen[type(block)] += 1
    assert seen[ResBlock] >= 4 and seen[AttentionBlock] >= 1


@pytest.mark.parametrize(
    "model",
    [lambda: tiny_dit(input_size=16, patch_size=4, in_channels=4, out_channels=8),
     lambda: tiny_unet(input_size=16, in_channels=4, out_channels=8, channel_mult=[1, 2, 2])],
)
def test_output_shape_other_configs(model):
    model = perturb(model())
    x, t, _ = inputs(channels=4, size=16)
    assert model(x, t).shape == (2, 8, 16, 16)
    assert model(x.to(memory_format=torch.channels_last), t).shape == (2, 8, 16, 16)


@pytest.mark.parametrize("name", FACTORIES)
def test_output_depends_on_t_and_cond(name):
    model = perturb(FACTORIES[name](cond_dim=5)).eval()
    x, t, cond = inputs(cond_dim=5)
    out = model(x, t, cond)
    assert out.abs().max() > 0
    assert not torch.allclose(out, model(x, t + 100, cond))
    assert not torch.allclose(out, model(x, t, Cond(vector=cond.vector + 1)))


@pytest.mark.parametrize("name", FACTORIES)
def test_gradients_reach_every_parameter(name):
    model = perturb(FACTORIES[name](cond_dim=5))
    x, t, cond = inputs(cond_dim=5)
    loss = (model(x, t, cond) * torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", FACTORIES)
def test_batch_independence(name):
    model = perturb(FACTORIES[name](cond_dim=5)).eval()
    x, t, cond = inputs(batch=3, cond_dim=5)
    with torch.no_grad():
        batched = model(x, t, cond)
        single = model(x[1:2], t[1:2], cond[1:2])
    torch.testing.assert_close(batched[1:2], single, atol=1e-5, rtol=1e-4)


def expected_dit_params(hidden: int, depth: int, patch: int, cin: int, cout: int, mlp_ratio: float = 4.0) -> int:
    """Parameter count of the DiT architecture, from its layer shapes."""
    mlp = int(hidden * mlp_ratio)
    linear = lambda i, o: i * o + o  # noqa: E731
    embed = cin * patch * patch * hidden + hidden + linear(256, hidden) + linear(hidden, hidden)
    block = linear(hidden, 3 * hidden) + linear(hidden, hidden) + linear(hidden, mlp) + linear(mlp, hidden)
    block += linear(hidden, 6 * hidden)
    final = linear(hidden, 2 * hidden) + linear(hidden, patch * patch * cout)
    return embed + depth * block + final


def test_dit_size_preset_param_count():
    model = DiT(input_size=32, in_channels=4, size="S", patch_size=2)
    s = DIT_SIZES["S"]
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_dit_params(s["hidden_size"], s["depth"], 2, 4, 4)
    # DiT-S/2 (8 output channels, 1000+1 class table, learned pos-embed counted) is quoted as 33.0M.
    reference = expected_dit_params(384, 12, 2, 4, 8) + 1001 * 384 + 256 * 384
    assert abs(reference - 33.0e6) / 33.0e6 < 0.01


def test_dit_size_overrides_and_pos_embed_buffer():
    model = DiT(input_size=8, in_channels=3, size="S", depth=1)
    assert model.hidden_size == 384 and len(model.blocks) == 1
    assert "pos_embed" not in model.state_dict()
    assert all(p is not model.pos_embed for p in model.parameters())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DiT(input_size=8, in_channels=3, size="M"), r"unknown DiT size 'M'.*'XL'"),
        (lambda: DiT(input_size=8, in_channels=3, size=None, hidden_size=32), r"depth, num_heads"),
        (lambda: tiny_dit(input_size=10, patch_size=4), r"input_size=10.*patch_size=4"),
        (lambda: tiny_dit(num_heads=5), r"hidden_size=32.*num_heads=5"),
        (lambda: tiny_unet(input_size=10, channel_mult=(1, 2, 2)), r"input_size=10.*divisible by 4"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", FACTORIES)
def test_missing_cond_vector_raises(name):
    model = FACTORIES[name](cond_dim=5)
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"cond_dim=5.*cond=None"):
        model(x, t)
    with pytest.raises(ValueError, match=r"cond.vector=None"):
        model(x, t, Cond())


def test_unet_small_group_norm_and_list_config():
    model = tiny_unet(model_channels=12, channel_mult=[1, 2], attention_resolutions=[8, 4])
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert {m.num_channels: m.num_groups for m in norms}[12] == 12
    assert sum(isinstance(m, Attention) for m in model.modules()) == 2 + 1 + 4  # encoder, middle, decoder
    x, t, _ = inputs()
    assert model(x, t).shape == (2, 3, 8, 8)


def test_unet_heads_of_a_fixed_width():
    """num_head_channels: each attention level gets as many heads of that width as its channels hold (SD 2's
    layout), with the same weights as num_heads gives; a width that does not divide a level is named."""
    kw = dict(model_channels=16, channel_mult=[1, 2], attention_resolutions=[8, 4], num_groups=8)
    by_width, by_count = tiny_unet(num_head_channels=8, **kw), tiny_unet(num_heads=2, **kw)
    heads = {m.qkv.in_features: m.num_heads for m in by_width.modules() if isinstance(m, Attention)}
    assert heads == {16: 2, 32: 4}
    assert [p.shape for p in by_width.parameters()] == [p.shape for p in by_count.parameters()]
    x, t, _ = inputs()
    assert by_width(x, t).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"num_head_channels=12 does not divide the 16 channels"):
        tiny_unet(num_head_channels=12, **kw)


def test_timestep_and_pos_embeddings():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (3, 7) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :3], torch.ones(3)) and torch.equal(emb[:, -1], torch.zeros(3))
    pos = sincos_pos_embed_2d(16, 4)
    assert pos.shape == (16, 16)
    assert len({tuple(row.tolist()) for row in pos}) == 16


# -- non-square inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("shape", [(8, 12), (12, 4), (4, 16)])
def test_non_square_output_shape_and_finite(name, shape):
    model = perturb(FACTORIES[name](cond_dim=5, out_channels=6)).eval()
    x, t, cond = inputs(cond_dim=5)
    x = torch.randn(2, 3, *shape)
    out = model(x, t, cond)
    assert out.shape == (2, 6, *shape)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_unet_non_square_with_more_levels():
    model = perturb(tiny_unet(input_size=16, channel_mult=(1, 2, 2), attention_resolutions=(8,)))
    x = torch.randn(2, 3, 16, 24)
    assert model(x, torch.rand(2) * 1000).shape == (2, 3, 16, 24)


@pytest.mark.parametrize("name", FACTORIES)
def test_non_square_gradients_reach_every_parameter(name):
    model = perturb(FACTORIES[name](cond_dim=5))
    _, t, cond = inputs(cond_dim=5)
    x = torch.randn(2, 3, 4, 12, requires_grad=True)
    (model(x, t, cond) * torch.randn(2, 3, 4, 12)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name,shape,match", [
    ("dit", (8, 9), r"DiT input of 8x9 is not divisible by patch_size=2"),
    ("dit", (5, 8), r"DiT input of 5x8 is not divisible by patch_size=2"),
    ("mmdit", (10, 7), r"MMDiT input of 10x7 is not divisible by patch_size=2"),
    ("unet", (8, 6), r"UNet input of 8x6 is not divisible by 4"),
])
def test_non_divisible_shape_raises(name, shape, match):
    kw = dict(channel_mult=(1, 2, 2)) if name == "unet" else {}
    model = FACTORIES[name](**kw)
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(2, 3, *shape), t)


def _square_reference(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
    """The square-only forward pass: the stored pos_embed buffer and a square unpatchify."""
    h = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed.to(x.dtype)
    c = model.cond_embedder(t, cond)
    if isinstance(model, DiT):
        for block in model.blocks:
            h = block(h, c)
    else:
        ctx = None
        for block in model.blocks:
            h, ctx = block(h, ctx, c, None)
    g, p, ch = model.grid_size, model.patch_size, model.out_channels
    out = model.final_layer(h, c).reshape(x.shape[0], g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(x.shape[0], ch, g * p, g * p)


@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_square_base_shape_unchanged(name):
    model = perturb(FACTORIES[name](cond_dim=5, out_channels=6)).eval()
    x, t, cond = inputs(cond_dim=5)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 12), t, cond)  # a non-square shape first: must not touch the base path
        assert torch.equal(model(x, t, cond), _square_reference(model, x, t, cond))
    assert torch.equal(grid_pos_embed(model, (4, 4), x), model.pos_embed)
    assert torch.equal(sincos_pos_embed_2d(32, (4, 4))[None], model.pos_embed)


def test_pos_embed_of_other_grids_is_a_centred_crop():
    model = tiny_dit(input_size=16)  # 8x8 training grid
    x = torch.zeros(1)
    base = model.pos_embed[0].reshape(8, 8, 32)
    # A larger grid contains the training grid; extra rows/columns are split between both sides,
    # the odd one on top/left: (12, 11) -> training grid at rows 2..9, columns 2..9.
    big = grid_pos_embed(model, (12, 11), x)[0].reshape(12, 11, 32)
    assert torch.equal(big[2:10, 2:10], base)
    # Units are patches: one grid step is one position, continuing the training grid's progression.
    assert torch.equal(big[0, 2:10], sincos_pos_embed_2d(32, (1, 8), start=(-2, 0)).reshape(8, 32))
    # A smaller or mixed grid is a block of the training grid: (6, 5) -> rows 1..6, columns 1..5.
    small = grid_pos_embed(model, (6, 5), x)[0].reshape(6, 5, 32)
    assert torch.equal(small, base[1:7, 1:6])
    mixed = grid_pos_embed(model, (4, 12), x)[0].reshape(4, 12, 32)
    assert torch.equal(mixed[:, 2:10], base[2:6])
    # Row channels (first half) depend on the row only, column channels on the column only.
    assert torch.equal(mixed[:, :1, :16].expand(4, 12, 16), mixed[..., :16])
    assert torch.equal(mixed[:1, :, 16:].expand(4, 12, 16), mixed[..., 16:])


def test_pos_embed_cache_is_per_shape_and_dtype_and_not_state():
    model = perturb(tiny_dit())
    keys = set(model.state_dict())
    x, t, _ = inputs()
    x = torch.randn(2, 3, 8, 12)
    model(x, t)
    first = grid_pos_embed(model, (4, 6), x)
    assert grid_pos_embed(model, (4, 6), x) is first
    assert grid_pos_embed(model, (4, 6), x.double()).dtype == torch.float64
    assert grid_pos_embed(model, (6, 4), x).shape == (1, 24, 32)
    assert set(model.state_dict()) == keys and "pos_embed" not in keys
    assert not any(b is first for b in model.buffers())
    with torch.inference_mode():  # made while sampling, still usable for training
        model(torch.randn(2, 3, 12, 12), t)
    model(torch.randn(2, 3, 12, 12), t).sum().backward()


def test_unpatchify_non_square():
    img = torch.randn(2, 3, 4, 6)
    tokens = img.reshape(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, 2, 3), img)


def test_sincos_pos_embed_int_and_tuple_forms_agree():
    assert torch.equal(sincos_pos_embed_2d(16, 4), sincos_pos_embed_2d(16, (4, 4)))
    assert sincos_pos_embed_2d(16, (3, 5)).shape == (15, 16)


def test_unet_warns_of_attention_resolutions_that_match_no_level(caplog):
    """An entry that is no feature-map size of the U-Net (a config written for another input size) added no
    attention, silently."""
    with caplog.at_level("WARNING", logger="diffusion_train.models.unet"):
        model = tiny_unet(input_size=32, attention_resolutions=[16, 8])
    assert "attention_resolutions [8] match no level (feature maps [32, 16] at input_size 32)" in caplog.text
    assert sum(isinstance(m, Attention) for m in model.modules()) == 1 + 1 + 2  # level 16, middle, decoder
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusion_train.models.unet"):
        tiny_unet(input_size=16, attention_resolutions=[16, 8])
    assert "match no level" not in caplog.text
