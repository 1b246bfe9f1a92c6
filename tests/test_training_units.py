"""Unit tests for training utilities: LR schedules, checkpoint files, image grids, conditioning, the optimizer step
(the EMA: test_ema.py)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.conditioning.conditioner import ClassEmbedder, Conditioner
from diffusion_train.training import checkpointing
from diffusion_train.training.checkpointing import atomic_torch_save, load_checkpoint
from diffusion_train.training.images import grid, save_grid
from diffusion_train.training.lr_schedules import warmup_constant, warmup_cosine, warmup_stable_decay


# ------------------------------------------------------------------------------------------------
# LR schedules
# ------------------------------------------------------------------------------------------------
def _opt(lr=2.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_constant():
    opt = _opt()
    sched = warmup_constant(opt, warmup_steps=4)
    lrs = _lrs(sched, opt, 8)
    expected = [2.0 * min(1.0, (s + 1) / 4) for s in range(8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    opt0 = _opt()
    np.testing.assert_allclose(_lrs(warmup_constant(opt0, warmup_steps=0), opt0, 3), [2.0] * 3)


def test_warmup_cosine():
    base, warm, total, min_ratio = 2.0, 10, 110, 0.1
    opt = _opt(base)
    sched = warmup_cosine(opt, total_steps=total, warmup_steps=warm, min_ratio=min_ratio)
    lrs = _lrs(sched, opt, 150)

    def ref(step):
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step + 1 - warm) / (total - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    np.testing.assert_allclose(lrs, [base * ref(s) for s in range(150)], rtol=1e-12)
    # lrs[i] is the rate of optimizer step i + 1
    assert lrs[0] == pytest.approx(base / warm)
    assert lrs[warm - 1] == pytest.approx(base)  # the peak, at step `warm`, once
    assert lrs[warm] < base
    assert lrs[warm + 49] == pytest.approx(base * (min_ratio + (1 - min_ratio) / 2))  # halfway
    assert lrs[total - 1] == pytest.approx(base * min_ratio)  # the last step, `total`, at the minimum
    assert lrs[total - 2] > base * min_ratio
    assert lrs[149] == pytest.approx(base * min_ratio)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # monotone decay
    with pytest.raises(ValueError):
        warmup_cosine(_opt(), total_steps=10, warmup_steps=10)


@pytest.mark.parametrize("shape", ["sqrt", "linear", "cosine"])
def test_warmup_stable_decay(shape):
    base, warm, total, decay, min_ratio = 2.0, 5, 40, 10, 0.05
    opt = _opt(base)
    lrs = _lrs(warmup_stable_decay(opt, total_steps=total, warmup_steps=warm, decay_steps=decay, min_ratio=min_ratio,
                                   shape=shape), opt, 45)
    left = {"sqrt": lambda p: 1 - math.sqrt(p), "linear": lambda p: 1 - p,
            "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}[shape]

    def ref(step):  # the rate of optimizer step `step + 1`
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, max(0.0, (step + 1 - (total - decay)) / decay))
        return min_ratio + (1 - min_ratio) * left(prog)

    np.testing.assert_allclose(lrs, [base * ref(s) for s in range(45)], rtol=1e-12)
    assert lrs[warm - 1:total - decay] == [base] * (total - decay - warm + 1)  # stable up to the decay's start
    assert lrs[total - decay] < base and lrs[total - 1] == pytest.approx(base * min_ratio) == lrs[44]
    # a longer WSD run has the same rates until this one's decay starts: a branch point
    opt2 = _opt(base)
    longer = _lrs(warmup_stable_decay(opt2, total_steps=400, warmup_steps=warm, shape=shape), opt2, total - decay)
    assert longer == lrs[:total - decay]


def test_warmup_stable_decay_defaults_and_bad_settings():
    opt = _opt(1.0)
    lrs = _lrs(warmup_stable_decay(opt, total_steps=50), opt, 50)  # decay_fraction 0.2: the last 10 steps
    assert lrs[:40] == [1.0] * 40 and lrs[40] < 1.0 and lrs[49] == pytest.approx(0.0)
    for kw, match in (({"shape": "exp"}, "shape='exp'"), ({"decay_fraction": 0}, "decay_fraction=0"),
                      ({"decay_steps": 48, "warmup_steps": 5}, "start after the warm-up"),
                      ({"decay_steps": 0}, "at least 1 step")):
        with pytest.raises(ValueError, match=match):
            warmup_stable_decay(_opt(), total_steps=50, **kw)


# ------------------------------------------------------------------------------------------------
# checkpoint files
# ------------------------------------------------------------------------------------------------
def test_atomic_torch_save_writes_loadable_file(tmp_path):
    path = tmp_path / "sub" / "a.ckpt"
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    atomic_torch_save(obj, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], obj["w"]) and loaded["step"] == 7
    assert sorted(os.listdir(path.parent)) == ["a.ckpt"]
    # overwriting replaces the content
    atomic_torch_save({"step": 8}, path)
    assert load_checkpoint(path)["step"] == 8


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_torch_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert load_checkpoint(path)["step"] == 1


def test_atomic_torch_save_failure_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_load_checkpoint_garbage_raises_value_error(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"this is not a checkpoint" * 20)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_checkpoint_refuses_code(tmp_path):
    path = tmp_path / "code.ckpt"
    torch.save({"obj": SimpleNamespace(a=1)}, path)  # not loadable with weights_only=True
    with pytest.raises(ValueError, match="code.ckpt"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# image grids
# ------------------------------------------------------------------------------------------------
def _grid_images(n=6, c=3, h=5, w=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, h, w, generator=g) * 2.4 - 1.2  # includes values outside [-1, 1]


def test_grid_layout_and_values():
    x = _grid_images()
    pad, ncol = 2, 3
    arr = grid(x, ncol=ncol, pad=pad)
    h, w = 5, 4
    assert arr.dtype == np.uint8
    assert arr.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad, 3)
    expected_px = np.round((np.clip(x.numpy().astype(np.float64), -1, 1) + 1) * 127.5).astype(np.uint8)
    mask = np.zeros(arr.shape[:2], dtype=bool)
    for i in range(6):
        r, k = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        tile = arr[y0:y0 + h, x0:x0 + w]
        np.testing.assert_array_equal(tile, expected_px[i].transpose(1, 2, 0))
        mask[y0:y0 + h, x0:x0 + w] = True
    assert (arr[~mask] == 0).all()  # padding is black


def test_grid_value_mapping_and_incomplete_rows():
    x = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0), torch.zeros(1, 2, 2),
                     torch.full((1, 2, 2), -3.0), torch.full((1, 2, 2), 3.0)])
    arr = grid(x, ncol=3, pad=1)
    assert arr.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
    tiles = [arr[1 + r * 3:3 + r * 3, 1 + k * 3:3 + k * 3, 0] for r, k in (divmod(i, 3) for i in range(5))]
    assert [int(t.min()) for t in tiles] == [0, 255, 128, 0, 255]
    assert all(t.min() == t.max() for t in tiles)
    assert (arr[4:6, 7:9] == 0).all()  # the empty 6th slot


@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (1, "L")])
def test_save_grid_png(tmp_path, channels, mode):
    x = _grid_images(c=channels, h=8, w=8)
    path = save_grid(x, tmp_path / "out" / "grid.png", ncol=3)
    assert path == tmp_path / "out" / "grid.png"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (3 * 10 + 2, 2 * 10 + 2)  # (width, height)
        assert img.mode == mode
        arr = np.asarray(img)
    ref = grid(x, 3)
    np.testing.assert_array_equal(arr, ref[..., 0] if channels == 1 else ref)
    assert sorted(os.listdir(tmp_path / "out")) == ["grid.png"]


# ------------------------------------------------------------------------------------------------
# conditioning
# ------------------------------------------------------------------------------------------------
def _conditioner(dropout, num_classes=10, dim=6):
    torch.manual_seed(0)
    return Conditioner({"class": ClassEmbedder(num_classes, dim, dropout=dropout)})


def _null(cond: Conditioner) -> torch.Tensor:
    emb = cond.embedders["class"]
    return emb.embedding.weight[emb.num_classes].detach()


def _is_null(vectors, null):
    return (vectors == null).all(dim=1)


def test_conditioner_no_dropout_never_drops():
    cond = _conditioner(0.0).train()
    labels = torch.arange(10).repeat(20)
    out = cond({"label": labels}, generator=torch.Generator().manual_seed(0))
    weight = cond.embedders["class"].embedding.weight.detach()
    assert out.vector.shape == (200, 6)
    torch.testing.assert_close(out.vector, weight[labels], rtol=0, atol=0)
    assert not _is_null(out.vector, _null(cond)).any()
    assert cond.vector_dim == 6


def test_conditioner_dropout_half_in_train_mode():
    cond = _conditioner(0.5).train()
    n = 4000
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    out = cond({"label": labels}, generator=torch.Generator().manual_seed(2))
    dropped = _is_null(out.vector, _null(cond))
    # Binomial(4000, 0.5): std 31.6, allow ~5 standard deviations
    assert abs(int(dropped.sum()) - n / 2) < 160
    weight = cond.embedders["class"].embedding.weight.detach()
    torch.testing.assert_close(out.vector[~dropped], weight[labels[~dropped]], rtol=0, atol=0)
    # the same generator seed drops the same rows; another seed drops other rows
    again = cond({"label": labels}, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.vector, out.vector)
    other = cond({"label": labels}, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(_is_null(other.vector, _null(cond)), dropped)


def test_conditioner_force_drop_uncond_and_eval():
    cond = _conditioner(0.5)
    labels = torch.arange(10)
    null = _null(cond)
    forced = cond({"label": labels}, force_drop=True)
    assert _is_null(forced.vector, null).all()
    unc = cond.uncond(7)
    assert unc.vector.shape == (7, 6) and _is_null(unc.vector, null).all()
    cond.eval()
    weight = cond.embedders["class"].embedding.weight.detach()
    for seed in range(3):
        out = cond({"label": labels.repeat(50)}, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out.vector, weight[labels.repeat(50)], rtol=0, atol=0)


def test_conditioner_errors_and_empty():
    cond = _conditioner(0.1)
    with pytest.raises(KeyError, match="label"):
        cond({"image": torch.zeros(2)})
    with pytest.raises(ValueError):
        ClassEmbedder(10, 4, dropout=1.0)
    empty = Conditioner()
    assert empty.vector_dim == 0
    assert empty({"label": torch.zeros(3)}).vector is None
    assert empty.uncond(3) == Cond()


def test_cond_cat_repeat_index():
    a = Cond(vector=torch.arange(6.0).reshape(2, 3), context=torch.ones(2, 4, 5), mask=torch.ones(2, 4, dtype=bool))
    b = Cond(vector=-torch.arange(3.0).reshape(1, 3), context=torch.zeros(1, 4, 5),
             mask=torch.zeros(1, 4, dtype=bool))
    c = Cond.cat([a, b])
    assert torch.equal(c.vector, torch.cat([a.vector, b.vector]))
    assert c.context.shape == (3, 4, 5) and torch.equal(c.context[2], torch.zeros(4, 5))
    assert c.mask.tolist() == [[True] * 4, [True] * 4, [False] * 4]

    r = a.repeat(3)
    assert r.vector.shape == (6, 3)
    assert torch.equal(r.vector, torch.cat([a.vector] * 3))
    assert torch.equal(r.mask, torch.cat([a.mask] * 3))

    sub = c[1:]
    assert torch.equal(sub.vector, c.vector[1:]) and sub.context.shape == (2, 4, 5)
    picked = c[torch.tensor([2, 0])]
    assert torch.equal(picked.vector, torch.stack([c.vector[2], c.vector[0]]))

    vec_only = Cond(vector=torch.ones(2, 3))
    both = Cond.cat([vec_only, Cond(vector=torch.zeros(1, 3))])
    assert both.context is None and both.mask is None and both.vector.shape == (3, 3)
    assert vec_only.repeat(2).context is None
    assert Cond.cat([Cond(), Cond()]) == Cond()
    with pytest.raises(ValueError, match="context"):
        Cond.cat([a, vec_only])
    moved = a.to("cpu")
    assert torch.equal(moved.vector, a.vector) and moved.mask.dtype == torch.bool


def test_sample_inputs_repeat_and_cycle_the_pools():
    cond = Conditioner({"label": ClassEmbedder(3, 4)})
    grid = cond.sample_inputs(6, repeat=2)["label"].tolist()
    assert grid == [0, 0, 1, 1, 2, 2]  # one row per class in a 2-column grid
    assert cond.sample_inputs(5, labels=[2, 0])["label"].tolist() == [2, 0, 2, 0, 2]
    with pytest.raises(ValueError, match=r"labels \[3\] are outside the model's 3 classes"):
        cond.sample_inputs(2, labels=[3])
    with pytest.raises(ValueError, match="unconditional"):
        Conditioner({}).sample_inputs(2, prompts=["a bag"])
    with pytest.raises(ValueError, match="prompts were given but the model is not conditioned on text"):
        cond.sample_inputs(2, prompts=["a bag"])
    with pytest.raises(ValueError, match=r"^labels=3: give a list of class indices, e.g. labels=\[3\]$"):
        cond.sample_inputs(2, labels=3)
    with pytest.raises(ValueError, match=r"^labels=\[\]: give at least one class index"):
        cond.sample_inputs(2, labels=[])

    class Text(torch.nn.Module):  # what input_pools asks of a text embedder: the batch key it reads
        input_key, context_dim, vector_dim = "caption", 8, 0

    text = Conditioner({"caption": Text()})
    assert text.sample_inputs(3, prompts="a photo of a bag") == {"caption": ["a photo of a bag"] * 3}  # not per letter
    assert text.sample_inputs(3, prompts=["a", "b"]) == {"caption": ["a", "b", "a"]}


# ------------------------------------------------------------------------------------------------
# The optimizer step
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_clip", [0.05, 1e3, None], ids=["clipping", "under_the_limit", "off"])
def test_fused_optimizer_clips_inside_its_kernel_as_clip_grad_norm_does(grad_clip):
    """With fused AdamW the clipping is the kernel's grad_scale divisor: the weights after three steps are those of
    clip_grad_norm_ followed by the unfused AdamW, the gradient norm returned is the unclipped one, and a
    non-finite gradient skips the step on the device and is counted."""
    from diffusion_train.training.module import DiffusionModule

    torch.manual_seed(0)
    fused_net, plain_net = nn.Linear(6, 4), nn.Linear(6, 4)
    plain_net.load_state_dict(fused_net.state_dict())
    fused = torch.optim.AdamW(fused_net.parameters(), lr=0.1, fused=True)
    plain = torch.optim.AdamW(plain_net.parameters(), lr=0.1, foreach=False)
    state = SimpleNamespace(trainable_parameters=lambda: list(fused_net.parameters()), grad_clip=grad_clip,
                            nonfinite_steps=torch.zeros((), dtype=torch.long),
                            nonfinite_streak=torch.zeros((), dtype=torch.long))
    norms = []
    for step in range(4):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for net in (fused_net, plain_net):
            net(x).pow(2).mean().mul(float("nan") if step == 2 else 1.0).backward()
        norm = DiffusionModule.optimizer_update(state, fused, [])
        norms.append(norm)
        want = torch.nn.utils.clip_grad_norm_(list(plain_net.parameters()), grad_clip or math.inf)
        if step != 2:
            plain.step()
        plain.zero_grad(set_to_none=True)
        torch.testing.assert_close(norm, want, equal_nan=True)
        for a, b in zip(fused_net.parameters(), plain_net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert all(p.grad is None for p in fused_net.parameters())
    assert int(state.nonfinite_steps) == 1 and int(state.nonfinite_streak) == 0
    finite = [float(n) for n in norms if torch.isfinite(n)]  # "clipping" clipped every step, "under_the_limit" none
    assert len(finite) == 3 and 0.05 < min(finite) and max(finite) < 1e3


def test_json_outputs_are_strict_and_written_whole(tmp_path, monkeypatch):
    """A diverged model's NaN FID is written as null (json.dumps would write NaN, which strict readers refuse);
    a failure while writing leaves the previous file, not a truncated one."""
    import json
    from pathlib import Path

    from diffusion_train.files import write_json

    path = write_json(tmp_path / "metrics.json", {"fid": math.nan, "ok": 1.5, "rows": [math.inf, 2], "p": Path("x")})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == \
        {"fid": None, "ok": 1.5, "rows": [None, 2], "p": "x"}

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"fid": 3.0})
    monkeypatch.undo()
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_script_arguments_split_into_paths_and_options(tmp_path, monkeypatch):
    """A mistyped option is an option (so that it is named as unknown), not a run folder; a path with '=' in it, or
    an existing file named like an option, stays a path."""
    from diffusion_train.cli import split_arguments

    (tmp_path / "model=dit").mkdir()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "rows=3").mkdir()
    options = {"rows": int, "validate": str}
    argv = ["runs/a", f"{tmp_path}/model=dit", "rows=2", "validat=true", "wandb:team/project"]
    assert split_arguments(argv, options) == (["runs/a", f"{tmp_path}/model=dit", "wandb:team/project"],
                                              ["rows=2", "validat=true"])
    monkeypatch.chdir(odd)
    assert split_arguments(["rows=3", "x=1"], {}) == (["rows=3"], ["x=1"])  # a folder named rows=3 is there
