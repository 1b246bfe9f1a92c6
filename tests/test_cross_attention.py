"""Tests for text conditioning through cross-attention (``context_dim > 0``; tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models import DiT, MMDiT, UNet
from diffusion_train.models.layers import Attention, CrossAttention, context_from_cond
from diffusion_train.models.unet import AttentionBlock, SpatialTransformer

CTX = 6  # context width
LEN = 5  # context length


def tiny_dit(**kw) -> DiT:
    cfg = dict(input_size=8, in_channels=3, size=None, hidden_size=32, depth=2, num_heads=4, context_dim=CTX)
    return DiT(**{**cfg, **kw})


def tiny_unet(**kw) -> UNet:
    cfg = dict(input_size=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_heads=2, context_dim=CTX)
    return UNet(**{**cfg, **kw})


def tiny_mmdit(**kw) -> MMDiT:
    cfg = dict(input_size=8, in_channels=3, depth=2, hidden_size=32, num_heads=4, context_dim=CTX)
    return MMDiT(**{**cfg, **kw})


FACTORIES = {"dit": tiny_dit, "unet": tiny_unet, "mmdit": tiny_mmdit}


def perturb(model: nn.Module, skip: str | None = None) -> nn.Module:
    """Move every parameter (except names containing ``skip``) away from its (possibly zero) init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip is None or skip not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(batch: int = 3, cond_dim: int = 0):
    """x, t and a Cond whose mask has a different number of real tokens per sample (>= 1)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 8, 8)
    t = torch.rand(batch) * 1000
    lengths = torch.tensor([LEN, 2, 3, 1][:batch] + [LEN] * max(0, batch - 4))
    mask = torch.arange(LEN)[None, :] < lengths[:, None]
    cond = Cond(vector=torch.randn(batch, cond_dim) if cond_dim else None,
                context=torch.randn(batch, LEN, CTX), mask=mask)
    return x, t, cond


def with_context(cond: Cond, context: torch.Tensor, mask: torch.Tensor | None = ...) -> Cond:
    return Cond(vector=cond.vector, context=context, mask=cond.mask if mask is ... else mask)


# ----------------------------------------------------------------------------- CrossAttention


def test_cross_attention_mask_equals_truncated_context():
    torch.manual_seed(0)
    attn = CrossAttention(16, CTX, num_heads=4)
    x, context = torch.randn(2, 7, 16), torch.randn(2, LEN, CTX)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, True, False]])
    out = attn(x, context, mask)
    assert out.shape == (2, 7, 16)
    for i in range(2):
        ref = attn(x[i:i + 1], context[i:i + 1, mask[i]])
        torch.testing.assert_close(out[i:i + 1], ref)
    # mask=None attends everywhere, like an all-True mask; int 0/1 masks read as bool.
    torch.testing.assert_close(attn(x, context), attn(x, context, torch.ones(2, LEN, dtype=torch.bool)))
    torch.testing.assert_close(out, attn(x, context, mask.long()))


def test_cross_attention_empty_rows_output_zero_without_nan():
    torch.manual_seed(0)
    attn = CrossAttention(16, CTX, num_heads=2)
    x = torch.randn(2, 7, 16, requires_grad=True)
    context = torch.randn(2, LEN, CTX)
    mask = torch.tensor([[False] * LEN, [True, True, False, False, False]])
    out = attn(x, context, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], attn(x[1:], context[1:], mask[1:]))
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    assert torch.isfinite(x.grad).all()
    # An empty sequence (L == 0) also attends to nothing.
    empty = attn(x, context[:, :0], mask[:, :0])
    assert torch.equal(empty, torch.zeros_like(empty))


def test_context_from_cond_errors():
    assert context_from_cond(None, 0) == (None, None)
    context = torch.randn(2, LEN, CTX)
    with pytest.raises(ValueError, match=rf"context_dim={CTX}.*\(B, L, {CTX}\).*cond=None"):
        context_from_cond(None, CTX)
    with pytest.raises(ValueError, match=r"cond.context=None"):
        context_from_cond(Cond(vector=torch.randn(2, 3)), CTX)
    with pytest.raises(ValueError, match=rf"\(B, L, {CTX}\).*shape \(2, {LEN}, 4\)"):
        context_from_cond(Cond(context=torch.randn(2, LEN, 4)), CTX)
    with pytest.raises(ValueError, match=r"cond.mask must have shape"):
        context_from_cond(Cond(context=context, mask=torch.ones(2, LEN + 1, dtype=torch.bool)), CTX)
    with pytest.raises(ValueError, match=r"batch size 2.*batch size 3"):
        context_from_cond(Cond(context=context), CTX, batch_size=3)


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("cfg", [dict(), dict(cond_dim=5, out_channels=6)])
def test_shape_zero_init_and_attribute(name, cfg):
    model = FACTORIES[name](**cfg)
    assert model.context_dim == CTX and model.in_channels == 3 and model.input_size == 8
    x, t, cond = inputs(cond_dim=cfg.get("cond_dim", 0))
    out = model(x, t, cond)
    assert out.shape == (3, cfg.get("out_channels", 3), 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", FACTORIES)
def test_default_has_no_cross_attention_and_ignores_context(name):
    model = FACTORIES[name](context_dim=0)
    assert model.context_dim == 0
    assert not any(isinstance(m, (CrossAttention, SpatialTransformer)) for m in model.modules())
    perturb(model)
    x, t, cond = inputs()
    torch.testing.assert_close(model(x, t, cond), model(x, t))


def test_unet_transformer_blocks_replace_attention():
    model = tiny_unet(transformer_depth=2)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    assert sum(isinstance(m, SpatialTransformer) for m in model.modules()) == 1 + 1 + 2  # encoder, middle, decoder
    assert sum(isinstance(m, CrossAttention) for m in model.modules()) == 2 * 4
    assert sum(isinstance(m, Attention) for m in model.modules()) == 2 * 4


@pytest.mark.parametrize("name, zero", [("dit", "cross_attn.proj"), ("unet", "proj_out")])
def test_cross_attention_branch_starts_as_identity(name, zero):
    model = perturb(FACTORIES[name](), skip=zero).eval()
    x, t, cond = inputs()
    out = model(x, t, cond)
    assert out.abs().max() > 0
    torch.testing.assert_close(out, model(x, t, with_context(cond, torch.randn_like(cond.context))))


@pytest.mark.parametrize("name", FACTORIES)
def test_output_depends_on_real_tokens_only(name):
    model = perturb(FACTORIES[name](cond_dim=5)).eval()
    x, t, cond = inputs(cond_dim=5)
    with torch.no_grad():
        out = model(x, t, cond)
        # Changing only real (mask True) tokens changes every sample's output.
        real = cond.context + torch.randn_like(cond.context) * cond.mask[..., None]
        changed = model(x, t, with_context(cond, real))
        for i in range(3):
            assert not torch.allclose(out[i], changed[i]), i
        # Changing padded (mask False) tokens changes nothing.
        padded = cond.context + 100 * torch.randn_like(cond.context) * ~cond.mask[..., None]
        torch.testing.assert_close(model(x, t, with_context(cond, padded)), out)
        # Without a mask the padded tokens are attended to.
        assert not torch.allclose(model(x, t, with_context(cond, cond.context, None)), out)


@pytest.mark.parametrize("name", FACTORIES)
def test_missing_or_bad_context_raises(name):
    model = FACTORIES[name]()
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=rf"context_dim={CTX}.*cond.context of shape \(B, L, {CTX}\).*cond=None"):
        model(x, t)
    with pytest.raises(ValueError, match=r"cond.context=None"):
        model(x, t, Cond())
    with pytest.raises(ValueError, match=r"cond.context of shape"):
        model(x, t, Cond(context=torch.randn(3, LEN, CTX + 1)))
    with pytest.raises(ValueError, match=r"cond.mask must have shape"):
        model(x, t, with_context(cond, cond.context, cond.mask[:, :2]))


@pytest.mark.parametrize("name", FACTORIES)
def test_gradients_reach_every_parameter(name):
    model = perturb(FACTORIES[name](cond_dim=5))
    x, t, cond = inputs(cond_dim=5)
    loss = (model(x, t, cond) * torch.randn(3, 3, 8, 8)).sum()
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    text = ("context_embedder", "text.qkv") if name == "mmdit" else ("cross_attn.kv", "cross_attn.q")
    assert all(any(part in n for n in names) for part in text)
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", FACTORIES)
def test_batch_independence(name):
    model = perturb(FACTORIES[name](cond_dim=5)).eval()
    x, t, cond = inputs(batch=4, cond_dim=5)
    with torch.no_grad():
        batched = model(x, t, cond)
        for i in (1, 3):
            # The single sample sees only its real tokens, unpadded.
            n = int(cond.mask[i].sum())
            unpadded = Cond(vector=cond.vector[i:i + 1], context=cond.context[i:i + 1, :n])
            single = model(x[i:i + 1], t[i:i + 1], unpadded)
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FACTORIES)
def test_all_false_mask_rows_are_finite_and_ignore_context(name):
    model = perturb(FACTORIES[name]())
    x, t, cond = inputs()
    mask = cond.mask.clone()
    mask[1] = False
    out = model(x, t, with_context(cond, cond.context, mask))
    assert torch.isfinite(out).all()
    other = model(x, t, with_context(cond, torch.randn_like(cond.context), mask))
    torch.testing.assert_close(out[1], other[1])
    assert not torch.allclose(out[0], other[0])
    # Same result as a context with no tokens at all.
    empty = model(x[1:2], t[1:2], Cond(context=cond.context[1:2, :0]))
    torch.testing.assert_close(out[1:2], empty, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mmdit_joint_attention_streams():
    """Text tokens get their own weights; the last block's text stream has no output layers."""
    model = tiny_mmdit(depth=3)
    assert all(b.text is not None for b in model.blocks)
    assert [b.text.pre_only for b in model.blocks] == [False, False, True]
    assert not hasattr(model.blocks[-1].text, "mlp") and hasattr(model.blocks[0].text, "mlp")
    assert not any(isinstance(m, CrossAttention) for m in model.modules())
    assert tiny_mmdit(context_dim=0).context_embedder is None
    assert all(b.text is None for b in tiny_mmdit(context_dim=0).blocks)


# ----------------------------------------------------------------------------- no mask (attend_padding)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_mask_equals_an_all_true_mask_and_attention_runs_unmasked(name, monkeypatch):
    """``Cond.mask=None`` (every token attended to, as Stable Diffusion) gives what an all-True mask gives, and
    no attention call gets a mask, so a GPU can run flash attention."""
    import torch.nn.functional as F

    model = perturb(FACTORIES[name]()).eval()
    x, t, cond = inputs()
    full = with_context(cond, cond.context, torch.ones(cond.mask.shape, dtype=torch.bool))
    with torch.no_grad():
        ref = model(x, t, full)
    masks = []
    sdpa = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    with torch.no_grad():
        out = model(x, t, with_context(cond, cond.context, None))
    torch.testing.assert_close(out, ref)
    assert masks and all(m is None for m in masks)


def test_conditioner_mask_is_none_only_when_no_embedder_masks():
    from diffusion_train.conditioning.conditioner import Conditioner

    class Tokens(nn.Module):
        context_dim, vector_dim, dropout, input_key = CTX, 0, 0.0, "caption"

        def __init__(self, mask: bool):
            super().__init__()
            self.mask = mask

        def forward(self, values, drop=None):
            out = {"context": torch.ones(len(values), 2, CTX)}
            return {**out, "mask": torch.tensor([[True, False]] * len(values))} if self.mask else out

    batch = {"caption": ["a", "b"]}
    assert Conditioner({"a": Tokens(False), "b": Tokens(False)})(batch).mask is None
    mixed = Conditioner({"a": Tokens(False), "b": Tokens(True)})(batch)
    assert mixed.context.shape == (2, 4, CTX)
    assert mixed.mask.tolist() == [[True, True, True, False]] * 2


def test_cond_cat_of_unmasked_sequences_of_different_lengths_masks_the_padding():
    a, b = Cond(context=torch.randn(2, 3, CTX)), Cond(context=torch.randn(1, 5, CTX))
    assert Cond.cat([a, a]).mask is None
    both = Cond.cat([a, b])
    assert both.context.shape == (3, 5, CTX)
    assert both.mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[True] * 5]
