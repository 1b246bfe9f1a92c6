"""diffusers backbones (models/diffusers_backbones.py): a UNet2DConditionModel and a PixArt transformer loaded
from local files train with this package's objective; a ControlNet of a diffusers U-Net."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffusion_train.training.build import build_module

CONTROL = ["finetune=controlnet"]


TINY_UNET = dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                                          "CrossAttnUpBlock2D"),
                 cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)


def test_a_diffusers_unet_from_a_pipeline_folder_learns_here(tiny_cfg, tmp_path):
    """A random tiny UNet2DConditionModel saved as a pipeline's unet/ loads with its weights, takes gradients from our
    objective with t5_tiny's 64-wide context, counts its FLOPs with the attention, and takes LoRA's default targets."""
    from diffusers import UNet2DConditionModel

    from diffusion_train.scaling.flops import counted_macs, flop_counter_macs, forward_macs

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "pipe" / "unet")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet").state_dict()
    overrides = ["model=diffusers_unet", f"model.name_or_path={tmp_path / 'pipe'}", "conditioning=t5_tiny",
                 "data=fashion_mnist_captions", "data.batch_size=4", "data.val_size=8"]
    module = build_module(tiny_cfg(*overrides))
    assert all(torch.equal(module.backbone.unet.state_dict()[k], v) for k, v in saved.items())
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "caption": ["a red square", "a blue circle"]}
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.unet.conv_in.weight.grad.abs().sum() > 0
    macs = forward_macs(module.backbone, context_len=7)
    assert macs == flop_counter_macs(module.backbone, context_len=7) > counted_macs(module.backbone, context_len=7)

    lora = build_module(tiny_cfg(*overrides, "finetune=lora"))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad}
    assert {"to_q", "to_k", "to_v", "0"} <= adapted


def test_a_stable_diffusion_style_inpainting_unet_trains_and_inpaints_on_encoded_masked_images(tiny_cfg, tmp_path):
    """A 9-channel U-Net (noisy latents, mask, masked latents) with a KL autoencoder and task.masked_image=encoded,
    the inputs of Stable Diffusion's inpainting U-Net: its weights load as they are, it takes gradients from a
    batch of images, and inpainting gives back every known pixel."""
    from diffusers import UNet2DConditionModel
    from hydra.utils import instantiate

    torch.manual_seed(0)
    UNet2DConditionModel(**{**TINY_UNET, "sample_size": 16, "in_channels": 9, "out_channels": 4}).save_pretrained(
        tmp_path / "pipe" / "unet")
    cfg = tiny_cfg("model=diffusers_unet", f"model.name_or_path={tmp_path / 'pipe'}", "conditioning=t5_tiny",
                   "data=fashion_mnist_captions", "autoencoder=kl_tiny", "task=inpainting",
                   "task.masked_image=encoded", "sampler.steps=2")
    module = build_module(cfg)
    assert module.backbone.unet.conv_in.in_channels == 9 and module.task.masked_image == "encoded"
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": images, "caption": ["a shoe", "a bag"]}
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:20, 4:28] = 1
    out = module.inpaint(images, masks, {"caption": ["a shoe", "a bag"]}, instantiate(cfg.sampler), guidance_scale=2.0)
    known = (masks < 0.5).expand_as(images)
    assert torch.equal(out[known], images[known]) and not torch.equal(out[~known], images[~known])


def test_diffusers_unet_config_mismatches_are_named(tiny_cfg, tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "unet_only")
    fmnist = ["model=diffusers_unet", f"model.name_or_path={tmp_path / 'unet_only'}", "data=fashion_mnist"]
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="cross-attends to width 64, the conditioner gives 384"):
        build_module(tiny_cfg(*fmnist, "conditioning=text_minilm", "conditioning.embedders.caption.output=context"))
    with pytest.raises(InstantiationException, match="takes 1 input channels, the data, autoencoder and task give 3"):
        build_module(tiny_cfg(*fmnist, "conditioning=t5_tiny", "task=inpainting"))
    # cond.vector goes in as class_labels: a class embedding of ids, or of another width, is refused when built
    for extra, message in (({"num_class_embeds": 10}, r"\(num_class_embeds=10\) takes class ids or timesteps"),
                           ({"class_embed_type": "timestep"}, r"\(class_embed_type=timestep\) takes class ids"),
                           ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 32},
                            "takes a 32-wide vector, the conditioner gives 64")):
        UNet2DConditionModel(**TINY_UNET, **extra).save_pretrained(tmp_path / "classy")
        with pytest.raises(InstantiationException, match=message):
            build_module(tiny_cfg("model=diffusers_unet", f"model.name_or_path={tmp_path / 'classy'}",
                                  "data=fashion_mnist", "conditioning=class", "conditioning.embedders.label.dim=64"))


def test_a_diffusers_pixart_transformer_learns_here(tiny_cfg, tmp_path):
    """A random tiny PixArtTransformer2DModel saved as a pipeline's transformer/: loaded with its weights, the
    learned-variance half of its output dropped, gradients from our objective, LoRA's default targets."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2, num_layers=2,
                  sample_size=32, patch_size=2, cross_attention_dim=32, caption_channels=64, norm_num_groups=8)
    PixArtTransformer2DModel(**config).save_pretrained(tmp_path / "pipe" / "transformer")
    overrides = ["model=diffusers_pixart", f"model.name_or_path={tmp_path / 'pipe'}", "conditioning=t5_tiny",
                 "data=fashion_mnist_captions"]
    module = build_module(tiny_cfg(*overrides))
    saved = PixArtTransformer2DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer").state_dict()
    assert all(torch.equal(module.backbone.transformer.state_dict()[k], v) for k, v in saved.items())
    assert module.backbone.out_channels == 1
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "caption": ["a red square", "a blue circle"]}
    cond = module.conditioner(batch)
    with torch.no_grad():
        full = module.backbone.transformer(batch["image"], encoder_hidden_states=cond.context, timestep=torch.ones(2),
                                           added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                           encoder_attention_mask=cond.mask).sample
        torch.testing.assert_close(module.backbone(batch["image"], torch.ones(2), cond), full[:, :1])
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.transformer.pos_embed.proj.weight.grad.abs().sum() > 0
    lora = build_module(tiny_cfg(*overrides, "finetune=lora"))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad}
    assert {"to_q", "to_k", "to_v"} <= adapted


def test_controlnet_of_a_diffusers_unet(tiny_cfg, tmp_path):
    """diffusers' ControlNetModel made from the wrapped U-Net: the base output exactly at the start, the control
    reaching it after a few steps of the ControlNet alone."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "unet")
    module = build_module(tiny_cfg("model=diffusers_unet", f"model.name_or_path={tmp_path / 'unet'}",
                                   "conditioning=t5_tiny", "data=fashion_mnist_captions", *CONTROL))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 1, 32, 32, generator=g) * 2 - 1, "caption": ["a square", "a circle"]}
    x, t = torch.randn(2, 1, 32, 32, generator=g), torch.full((2,), 300.0)
    cond = replace(module.conditioner(batch), control=torch.rand(2, 1, 32, 32, generator=g) * 2 - 1)
    with torch.no_grad():
        base = module.backbone(x, t, replace(cond, control=None))
        assert torch.equal(module.net(x, t, cond), base)
    from diffusion_train.scaling import flop_counter_macs

    assert flop_counter_macs(module.controlnet, module.backbone.input_size, 64) > 0  # counted in the run's FLOPs
    opt = torch.optim.Adam(module.trainable_parameters(), lr=1e-2)
    assert {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad} == {"controlnet"}
    for step in range(2):
        module.loss(batch, torch.Generator().manual_seed(step)).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.allclose(module.net(x, t, cond), module.backbone(x, t, replace(cond, control=None)))


def test_controlnet_of_a_diffusers_unet_with_a_class_embedding_gets_the_vector(tiny_cfg, tmp_path):
    """A U-Net with a class embedding (here a projection of the text encoder's pooled vector) takes cond.vector as
    class labels, and so does its ControlNet, which copied that embedding: the base output at the start, and a
    vector that moves the ControlNet's residuals once they are non-zero."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET, class_embed_type="projection",
                         projection_class_embeddings_input_dim=64).save_pretrained(tmp_path / "unet")
    module = build_module(tiny_cfg("model=diffusers_unet", f"model.name_or_path={tmp_path / 'unet'}",
                                   "conditioning=t5_tiny", "conditioning.embedders.caption.output=both",
                                   "data=fashion_mnist_captions", *CONTROL))
    g = torch.Generator().manual_seed(0)
    cond = replace(module.conditioner({"caption": ["a square", "a circle"]}),
                   control=torch.rand(2, 1, 32, 32, generator=g) * 2 - 1)
    x, t = torch.randn(2, 1, 32, 32, generator=g), torch.full((2,), 300.0)
    with torch.no_grad():
        assert torch.equal(module.net(x, t, cond), module.backbone(x, t, replace(cond, control=None)))
        net = module.controlnet.net
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.normal_(generator=g)  # zero convolutions no more
        moved = module.controlnet(x, t, replace(cond, vector=cond.vector + 1.0))
        assert not torch.allclose(module.controlnet(x, t, cond)[-1], moved[-1])  # the middle block: after the emb


def test_flops_of_a_diffusers_unet_with_a_class_embedding(tiny_cfg, tmp_path):
    """The FLOP count's meta forward pass gave such a U-Net (and its ControlNet) no cond.vector, and diffusers
    refused it: every fit stopped at its start (the throughput callback counts the FLOPs there)."""
    from diffusers import UNet2DConditionModel

    from diffusion_train.scaling.flops import flop_counter_macs
    from diffusion_train.training.summary import run_forward_macs

    UNet2DConditionModel(**TINY_UNET, class_embed_type="projection",
                         projection_class_embeddings_input_dim=64).save_pretrained(tmp_path / "unet")
    overrides = ("model=diffusers_unet", f"model.name_or_path={tmp_path / 'unet'}", "conditioning=t5_tiny",
                 "conditioning.embedders.caption.output=both", "data=fashion_mnist_captions")
    plain = build_module(tiny_cfg(*overrides)).backbone
    assert plain.cond_dim == 64 and flop_counter_macs(plain, context_len=7) > 0
    controlled = build_module(tiny_cfg(*overrides, *CONTROL))
    assert run_forward_macs(controlled) > flop_counter_macs(controlled.backbone, context_len=7) > 0
