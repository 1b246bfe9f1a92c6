"""Tests for guidance (``diffusion/guidance.py``): classifier-free guidance's one batched call, its interval and
rescale, InstructPix2Pix's dual guidance, and how guidance and a denoiser's ``clip_x0`` combine."""

from __future__ import annotations

import pytest
import torch

from diffusion_train.conditioning.cond import Cond
from diffusion_train.diffusion.guidance import CFGDenoiser, DualGuidance
from diffusion_train.diffusion.objective import GaussianDiffusion
from diffusion_train.diffusion.samplers import Sampler, ddim, dpmpp_2m
from diffusion_train.diffusion.schedules import EDMSchedule, LinearSchedule
from diffusion_train.finetune.inpainting import KnownRegion


# ------------------------------------------------------------------------------------------------
# the guided estimate
# ------------------------------------------------------------------------------------------------
class CondDenoiser:
    """A denoiser whose output depends on x, t and the conditioning vector (per row)."""

    def __init__(self):
        self.schedule = LinearSchedule()
        self.calls: list[int] = []

    def alpha_sigma(self, t):
        return self.schedule.alpha_sigma(t)

    def timesteps(self, n, spacing):
        return self.schedule.timesteps(n, spacing)

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        a, _ = self.alpha_sigma(t)
        out = 0.5 * a.reshape(-1, 1) * x
        if cond is not None:
            out = out + torch.tanh(cond.vector @ torch.linspace(-1, 1, cond.vector.shape[1] * x.shape[1])
                                   .reshape(cond.vector.shape[1], x.shape[1]))
        return out


def _cfg_inputs(b=4, d=3, k=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g)
    t = torch.tensor([10.0, 200.0, 500.0, 999.0])[:b]
    cond = Cond(vector=torch.randn(b, k, generator=g))
    uncond = Cond(vector=torch.zeros(b, k) + 0.3)
    return x, t, cond, uncond


def test_cfg_scale_one_is_plain_denoiser():
    x, t, cond, uncond = _cfg_inputs()
    inner = CondDenoiser()
    out = CFGDenoiser(inner, uncond, 1.0)(x, t, cond)
    assert inner.calls == [4]
    torch.testing.assert_close(out, CondDenoiser()(x, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.5])
def test_cfg_combines_cond_and_uncond_in_one_batched_call(scale):
    x, t, cond, uncond = _cfg_inputs()
    inner = CondDenoiser()
    out = CFGDenoiser(inner, uncond, scale)(x, t, cond)
    assert inner.calls == [8]  # one forward pass with cond and uncond stacked
    ref = CondDenoiser()
    c, u = ref(x, t, cond), ref(x, t, uncond)
    torch.testing.assert_close(out, u + scale * (c - u), rtol=1e-5, atol=1e-6)


def test_sampler_with_guidance_uses_cfg_and_needs_uncond():
    x, _, cond, uncond = _cfg_inputs()
    sampler = Sampler(ddim, 5, "trailing")
    with pytest.raises(ValueError):
        sampler(CondDenoiser(), x, cond, guidance_scale=3.0)
    inner = CondDenoiser()
    out = sampler(inner, x, cond, uncond=uncond, guidance_scale=3.0)
    assert inner.calls == [8] * 5
    direct = ddim(CFGDenoiser(CondDenoiser(), uncond, 3.0), x, LinearSchedule().timesteps(5, "trailing"), cond)
    torch.testing.assert_close(out, direct)
    # scale 1 needs no uncond and makes single-batch calls
    inner1 = CondDenoiser()
    sampler(inner1, x, cond, guidance_scale=1.0)
    assert inner1.calls == [4] * 5


# ------------------------------------------------------------------------------------------------
# guidance interval and rescale
# ------------------------------------------------------------------------------------------------
class CondGaussian:
    """E[x0 | x_t] for x0 ~ N(c, tau^2 I), c = cond.vector (zeros without cond); EDM schedule, so
    sigma/alpha = t exactly."""

    def __init__(self, tau=0.5, schedule=None):
        self.schedule, self.tau, self.calls = schedule or EDMSchedule(), tau, []

    def alpha_sigma(self, t):
        return self.schedule.alpha_sigma(t)

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        a, s = (v.reshape(-1, 1) for v in self.alpha_sigma(t))
        mu = cond.vector if cond is not None else torch.zeros_like(x)
        return mu + a * self.tau**2 / (a**2 * self.tau**2 + s**2) * (x - a * mu)


def _cfg_batch(b=6, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, d, generator=g), Cond(vector=torch.randn(b, d, generator=g)),
            Cond(vector=torch.full((b, d), 0.25)))


def test_cfg_interval_outside_is_conditional_with_single_calls():
    x, cond, uncond = _cfg_batch()
    inner = CondGaussian()
    cfg = CFGDenoiser(inner, uncond, 4.0, interval=(1.0, 5.0))
    for t in (0.5, 1.0, 6.0, 80.0):  # lo < sigma <= hi is inactive at exactly lo
        inner.calls.clear()
        out = cfg(x, torch.full((6,), t), cond)
        assert inner.calls == [6]
        torch.testing.assert_close(out, CondGaussian()(x, torch.full((6,), t), cond), rtol=0, atol=0)


def test_cfg_interval_inside_is_guided_with_one_double_call():
    x, cond, uncond = _cfg_batch()
    for t in (1.5, 5.0):  # exactly hi is active
        inner = CondGaussian()
        out = CFGDenoiser(inner, uncond, 4.0, interval=(1.0, 5.0))(x, torch.full((6,), t), cond)
        assert inner.calls == [12]
        ref = CondGaussian()
        c, u = ref(x, torch.full((6,), t), cond), ref(x, torch.full((6,), t), uncond)
        torch.testing.assert_close(out, u + 4.0 * (c - u), rtol=1e-6, atol=1e-6)
    # rows at different t: guided where active, conditional elsewhere, still one 2B call
    t = torch.tensor([0.5, 2.0, 80.0, 3.0, 1.0, 5.0])
    inner = CondGaussian()
    out = CFGDenoiser(inner, uncond, 4.0, interval=(1.0, 5.0))(x, t, cond)
    assert inner.calls == [12]
    c, u = CondGaussian()(x, t, cond), CondGaussian()(x, t, uncond)
    active = torch.tensor([False, True, False, True, False, True]).reshape(-1, 1)
    torch.testing.assert_close(out, torch.where(active, u + 4.0 * (c - u), c), rtol=1e-6, atol=1e-6)


def test_sampler_with_guidance_interval_call_pattern():
    x, cond, uncond = _cfg_batch()
    sampler = Sampler(dpmpp_2m, 12, "karras")
    inner = CondGaussian()
    sampler(inner, x, cond, uncond=uncond, guidance_scale=3.0, guidance_interval=(0.3, 10.0))
    ts = inner.schedule.timesteps(12, "karras")
    assert inner.calls == [12 if 0.3 < float(t) <= 10.0 else 6 for t in ts]
    assert 6 in inner.calls and 12 in inner.calls


@pytest.mark.parametrize("schedule, time", [(EDMSchedule(), 0.8), (LinearSchedule(), 200.0),
                                            (LinearSchedule(rescale_zero_terminal_snr=True), 999.0)])
def test_cfg_rescale_matches_the_std_of_the_conditional_v_prediction(schedule, time):
    """Lin et al.'s rescale on v = alpha eps - sigma x0 (their model's output), for any model: written out here
    with eps = (x - alpha x0) / sigma and x0 = (alpha x - sigma v) / (alpha^2 + sigma^2); at zero SNR too."""
    x, cond, uncond = _cfg_batch()
    t = torch.full((6,), time)
    a, s = (v.reshape(-1, 1) for v in schedule.alpha_sigma(t))

    def v_of(x0):
        return a * (x - a * x0) / s - s * x0

    c, u = CondGaussian(schedule=schedule)(x, t, cond), CondGaussian(schedule=schedule)(x, t, uncond)
    guided = u + 6.0 * (c - u)
    v_c, v_g = v_of(c), v_of(guided)
    v_full = v_g * v_c.std(1, keepdim=True) / v_g.std(1, keepdim=True)
    full = CFGDenoiser(CondGaussian(schedule=schedule), uncond, 6.0, rescale=1.0)(x, t, cond)
    torch.testing.assert_close(v_of(full).std(1), v_c.std(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(full, (a * x - s * v_full) / (a**2 + s**2), rtol=1e-4, atol=1e-5)
    half = CFGDenoiser(CondGaussian(schedule=schedule), uncond, 6.0, rescale=0.3)(x, t, cond)
    torch.testing.assert_close(half, 0.3 * full + 0.7 * guided, rtol=1e-4, atol=1e-5)  # affine: blends alike
    none = CFGDenoiser(CondGaussian(schedule=schedule), uncond, 6.0, rescale=0.0)(x, t, cond)
    torch.testing.assert_close(none, guided, rtol=1e-6, atol=1e-6)
    if float(a[0]) > 0:  # not the std of the x0 estimate (the two agree only at alpha = 0)
        assert not torch.allclose(full.std(1), c.std(1), rtol=1e-2)


@pytest.mark.parametrize("kwargs", [{"interval": (5.0, 1.0)}, {"interval": (2.0, 2.0)}, {"rescale": -0.1},
                                    {"rescale": 1.5}])
def test_cfg_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        CFGDenoiser(CondGaussian(), Cond(vector=torch.zeros(1, 2)), 3.0, **kwargs)


# ------------------------------------------------------------------------------------------------
# clip_x0 with guidance: the guided estimate is clipped, not the estimates it combines
# ------------------------------------------------------------------------------------------------
def _x0_net(x, t, cond):
    """An x0-predicting network whose estimate is each row's cond.vector, broadcast over the image."""
    return cond.vector.reshape(-1, 1, 1, 1).expand_as(x).clone()


def _clip_inputs(c, u, b=2):
    x, t = torch.randn(b, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.full((b,), 500.0)
    return x, t, Cond(vector=torch.full((b, 1), c)), Cond(vector=torch.full((b, 1), u))


@pytest.mark.parametrize("c,u,scale,clipped", [(1.4, -0.2, 0.5, 0.6), (0.9, -0.9, 7.5, 1.0), (0.9, -0.9, -1.0, -1.0)])
def test_cfg_clips_the_guided_estimate(c, u, scale, clipped):
    x, t, cond, uncond = _clip_inputs(c, u)
    guided = u + scale * (c - u)
    for clip_x0, want in ((True, clipped), (False, guided)):
        den = GaussianDiffusion(LinearSchedule(), "x0", clip_x0=clip_x0).denoiser(_x0_net)
        out = CFGDenoiser(den, uncond, scale)(x, t, cond)
        torch.testing.assert_close(out, torch.full_like(x, want), rtol=0, atol=1e-6)
        # without guidance the estimate is clipped as before
        torch.testing.assert_close(den(x, t, cond), torch.full_like(x, min(c, 1.0) if clip_x0 else c))
    # a whole sampler's output stays in [-1, 1]
    den = GaussianDiffusion(LinearSchedule(), "eps", clip_x0=True).denoiser(lambda x, t, c: torch.randn_like(x) * 3)
    out = Sampler(ddim, 5, "trailing")(den, torch.randn(2, 1, 2, 2), cond, uncond=uncond, guidance_scale=7.5)
    assert float(out.abs().max()) <= 1.0


def test_dual_guidance_clips_the_guided_estimate():
    x, t, cond, no_text = _clip_inputs(1.4, 0.2)
    neither = Cond(vector=torch.full((2, 1), -0.2))
    den = GaussianDiffusion(LinearSchedule(), "x0", clip_x0=True).denoiser(_x0_net)
    out = DualGuidance(den, no_text, neither, text_scale=0.5, image_scale=1.5)(x, t, cond)
    # 0.2 + 0.5 (1.4 - 0.2) + 0.5 (0.2 + 0.2) = 1.0; with the estimates clipped first, 0.8
    torch.testing.assert_close(out, torch.full_like(x, 0.8 + 0.2), rtol=0, atol=1e-6)
    out = DualGuidance(den, no_text, neither, text_scale=0.25, image_scale=1.5)(x, t, cond)
    torch.testing.assert_close(out, torch.full_like(x, 0.2 + 0.25 * 1.2 + 0.5 * 0.4), rtol=0, atol=1e-6)


def test_known_region_under_guidance_keeps_the_known_pixels_and_clips_the_rest():
    x, t, cond, uncond = _clip_inputs(1.4, -0.2)
    den = GaussianDiffusion(LinearSchedule(), "x0", clip_x0=True).denoiser(_x0_net)
    known = torch.full((2, 1, 2, 2), -0.5)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 1, 2, 2)  # 1: generated, 0: known
    out = CFGDenoiser(KnownRegion(den, known, mask), uncond, 0.5)(x, t, cond)
    torch.testing.assert_close(out, torch.where(mask > 0.5, torch.tensor(0.6), torch.tensor(-0.5)), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(KnownRegion(den, known, mask)(x, t, cond),
                               torch.where(mask > 0.5, torch.tensor(1.0), torch.tensor(-0.5)))


def test_an_unconditional_model_samples_guided_without_a_second_pass(tiny_cfg):
    """With nothing to drop, the unconditional pass repeats the conditional one: a guidance scale (2 by default in
    diffusion-sample, -eval and the callbacks) doubled the network's work and changed nothing."""
    from conftest import module_of

    module = module_of(tiny_cfg, "conditioning=none")
    rows = []
    module.backbone.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    sampler = Sampler(lambda *a, **k: ddim(*a, eta=0.0, **k), steps=2)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = module.sample(noise, {}, sampler, guidance_scale=1.0)
    guided = module.sample(noise, {}, sampler, guidance_scale=2.0)
    assert torch.equal(plain, guided) and rows == [2] * 4
