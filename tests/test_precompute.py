"""Precomputed latents and text encodings: same loss as online encoding, provenance refusal, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, compose_train
from diffusion_train.data.precomputed import (
    MANIFEST,
    PrecomputedDataModule,
    PrecomputedMismatchError,
    _diffs,
)
from diffusion_train.data.precompute_writer import write_precomputed
from diffusion_train.train import train
from diffusion_train.training.build import build_module

ROOT = Path(__file__).resolve().parent.parent
# Fashion-MNIST captions, a random TinyVAE (4x down: 32x32x1 -> 8x8x4), the offline MiniLM text encoder.
LATENT_TEXT = TINY + ["data=fashion_mnist_captions", "data.batch_size=8", "data.val_size=16",
                      "conditioning=text_minilm", "conditioning.embedders.caption.dropout=0.5",
                      "autoencoder=tiny_vae", "model=unet_tiny"]


def _parts(overrides, tmp_path):
    cfg = compose_train(LATENT_TEXT + list(overrides), tmp_path / "run")
    L.seed_everything(cfg.seed, verbose=False)  # as train() and scripts/precompute.py do before building
    datamodule = instantiate(cfg.data, _convert_="all")
    return cfg, datamodule, build_module(cfg)


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
    """A float32 set of the first 24 items per split, made with the LATENT_TEXT config."""
    tmp = tmp_path_factory.mktemp("pre")
    cfg, datamodule, module = _parts([], tmp)
    out = tmp / "set"
    manifest = write_precomputed(out, datamodule, module.autoencoder, module.conditioner, batch_size=10,
                                 dtype="float32", limit=24)
    return out, manifest, datamodule


def test_precomputed_training_loss_equals_online_encoding(precomputed, tmp_path):
    out, _, online = precomputed
    _, _, module = _parts([], tmp_path)  # rebuilt from the config: the same random VAE
    pre = PrecomputedDataModule(out, channels=1, resolution=32, num_classes=10)
    pre.setup()
    module.train()
    idx = [3, 0, 17, 9, 9, 21, 5, 12]
    a, b = online.train_set[idx], pre.train_set[idx]
    assert "image" not in b and b["latent"].shape == (8, 8, 8, 8)
    assert b["caption"] == a["caption"] and torch.equal(a["label"], b["label"])
    for seed in range(3):  # different posterior samples, dropout patterns, timesteps and noise
        la = module.loss(a, torch.Generator().manual_seed(seed))
        lb = module.loss(b, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    dropped = module.conditioner.embedders["caption"]
    assert dropped.dropout == 0.5  # so some rows of each seed took the empty-caption encoding


def test_precomputed_training_runs_the_text_encoder_only_for_the_empty_caption(precomputed, tmp_path):
    out, _, _ = precomputed
    _, _, module = _parts([], tmp_path)
    emb = module.conditioner.embedders["caption"]
    calls = []
    original = emb._encode
    emb._encode = lambda texts: (calls.append(list(texts)), original(texts))[1]
    pre = PrecomputedDataModule(out, channels=1, resolution=32, num_classes=10)
    pre.setup()
    module.train()
    for i in range(3):
        module.loss(pre.train_set[list(range(8 * i, 8 * i + 8))], torch.Generator().manual_seed(i))
    assert calls == [[""]], "stored encodings are used; only the CFG null caption is encoded, once"


def test_float16_storage_is_close_and_captions_are_stored_once(tmp_path):
    cfg, datamodule, module = _parts([], tmp_path)
    manifest = write_precomputed(tmp_path / "fp16", datamodule, module.autoencoder, module.conditioner,
                                 dtype="float16", limit=40, splits=["train"])
    assert manifest["dtype"] == "float16" and manifest["splits"]["train"]["count"] == 40
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "fp16/train.safetensors"))
    distinct = json.loads((tmp_path / "fp16/train.captions.json").read_text())["caption"]
    captions = datamodule.train_set[list(range(40))]["caption"]
    assert len(distinct) == len(set(captions)) < 40  # templated captions: each distinct one stored once
    assert tensors["caption.context"].shape == (len(distinct), 32, 384)
    assert tensors["caption.context"].dtype == torch.float16 and tensors["caption.mask"].dtype == torch.bool
    assert [distinct[i] for i in tensors["caption.index"].tolist()] == captions
    online = module.autoencoder.encode_moments(datamodule.train_set[list(range(40))]["image"])
    torch.testing.assert_close(tensors["latent"].float(), online, rtol=2e-3, atol=2e-3)


def test_config_reads_the_source_shape_from_the_manifest(precomputed, tmp_path):
    out, manifest, _ = precomputed
    cfg = compose_train(LATENT_TEXT + ["data=precomputed", f"data.path={out}"], tmp_path / "run")
    assert (cfg.data.channels, cfg.data.resolution, cfg.data.num_classes) == (1, 32, 10)
    module = build_module(cfg)
    assert (module.backbone.in_channels, module.backbone.input_size) == (4, 8)
    assert manifest["embedders"]["caption"]["class"] == "HFTextEmbedder"
    assert manifest["autoencoder"]["class"] == "TinyVAE" and len(manifest["autoencoder"]["sha256"]) == 64


def test_training_on_a_precomputed_set_end_to_end(precomputed, tmp_path):
    out, _, _ = precomputed
    run = tmp_path / "run"
    cfg = compose_train(LATENT_TEXT + ["data=precomputed", f"data.path={out}", "trainer.max_steps=2",
                                       "callbacks.sample_grid.prompts=[a bag]", "callbacks.sample_grid.per_class=2"],
                        run)
    trainer = train(cfg, run)
    assert trainer.global_step == 2
    assert (run / "samples/step_0000002.png").is_file()  # sampled latents decoded by the VAE
    assert trainer.lightning_module.autoencoder.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("override, key", [
    ("autoencoder.latent_channels=2", "autoencoder.latent_channels"),
    ("seed=7", "autoencoder.sha256"),  # another random init
    ("conditioning.embedders.caption.max_length=16", "conditioning.embedders.caption.max_length"),
    ("+conditioning.embedders.caption.dtype=bfloat16", "conditioning.embedders.caption.dtype"),
    ("conditioning.embedders.caption.trainable=true", "conditioning.embedders.caption.trainable=true, but"),
])
def test_a_set_made_with_other_encoders_is_refused(precomputed, tmp_path, override, key):
    out, _, _ = precomputed
    cfg = compose_train(LATENT_TEXT + ["data=precomputed", f"data.path={out}", override], tmp_path / "run")
    with pytest.raises(PrecomputedMismatchError, match=rf"precomputed set {out} does not match .*{key}"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("conditioning, override, key", [
    (["conditioning=clip_tiny"], "conditioning.embedders.caption.pad_token_id=0", "pad_token_id"),  # clip_l14's
    (["conditioning=t5_tiny", "conditioning.embedders.caption.config.vocab_size=30522"],  # ByT5 against MiniLM's
     "conditioning.embedders.caption.tokenizer={minilm}", "tokenizer_name"),
])
def test_the_encoder_settings_that_change_encodings_are_compared(tmp_path, conditioning, override, key):
    """The padding token (attended to with attend_padding) and T5's tokenizer change the stored encodings; they
    were not compared. A set made before they were recorded is not refused for them."""
    from hydra.utils import instantiate

    from diffusion_train.conditioning.hf_text import minilm_path
    from diffusion_train.data.precomputed import embedder_provenance

    override = override.format(minilm=minilm_path())

    def caption(*extra):
        cfg = compose_train(["data=fashion_mnist_captions", *conditioning, *extra], tmp_path)
        torch.manual_seed(0)  # the same random tower
        return embedder_provenance(instantiate(cfg.conditioning.embedders.caption, _convert_="all"))

    made, now = caption(), caption(override)
    assert _diffs(made, now, "caption") == [f"caption.{key}: set has {made[key]!r}, config gives {now[key]!r}"]
    assert _diffs({k: v for k, v in made.items() if k != key}, now, "caption") == []


def test_the_same_weights_at_another_path_are_accepted_and_other_weights_are_not():
    made = {"class": "TinyVAE", "name": "vae.safetensors", "path": "/a/vae.safetensors", "sha256": "abc"}
    assert _diffs(made, {**made, "name": "copy.safetensors", "path": "/b/copy.safetensors"}, "autoencoder") == []
    assert _diffs(made, {**made, "path": "/b/vae.safetensors", "sha256": "def"}, "autoencoder") == [
        "autoencoder.path: set has '/a/vae.safetensors', config gives '/b/vae.safetensors'",
        "autoencoder.sha256: set has 'abc', config gives 'def'"]
    unknown = {**made, "sha256": ""}  # no digest: the location is all there is to compare
    assert _diffs(unknown, {**unknown, "path": "/b/vae.safetensors"}, "autoencoder") == [
        "autoencoder.path: set has '/a/vae.safetensors', config gives '/b/vae.safetensors'"]


def test_unreadable_set_files_are_named(precomputed, tmp_path):
    import shutil

    out, _, _ = precomputed
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "train.safetensors").write_bytes(b"\x00" * 12)
    data = PrecomputedDataModule(broken, channels=1, resolution=32, num_classes=10)
    with pytest.raises(ValueError, match=rf"{broken / 'train.safetensors'}: not a readable safetensors file"):
        data.setup()
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{broken / MANIFEST}: not valid JSON"):
        PrecomputedDataModule(broken, channels=1, resolution=32, num_classes=10)


def test_damaged_set_tensors_are_named_and_non_finite_items_skipped(precomputed, tmp_path, caplog):
    """A set whose tensors were damaged trained on: latents of another shape than the manifest's (silently), labels
    out of range or fewer labels than latents (IndexError), no labels ("error: label"), NaN latents (each made its
    whole batch's step non-finite). Now a one-line error naming the file, and non-finite items skipped and
    counted; one that a non-finite text encoding reaches too. A precompute whose values overflow its dtype fails."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, _, datamodule = precomputed

    def damaged(name: str, change) -> PrecomputedDataModule:
        folder = tmp_path / name
        shutil.copytree(out, folder)
        tensors = load_file(str(folder / "train.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "train.safetensors"))
        return PrecomputedDataModule(folder, channels=1, resolution=32, num_classes=10)

    file = rf"{tmp_path}/\w+/train.safetensors"
    for name, change, error in [
        ("shape", lambda t: t.update(latent=t["latent"][:, :, :4, :4].contiguous()),
         r"latents of shape \[8, 4, 4\], the manifest says \[8, 8, 8\]"),
        ("short", lambda t: t.update(label=t["label"][:10].contiguous()), r"24 latents but \{'label': 10\} rows"),
        ("range", lambda t: t["label"].__setitem__(3, 99), r"labels outside \[0, 10\) \(e.g. 99\)"),
        ("nolabel", lambda t: t.pop("label"), r"no 'label' tensor"),
        ("allnan", lambda t: t["latent"].fill_(float("nan")), r"every item holds non-finite values"),
    ]:
        with pytest.raises(ValueError, match=rf"^{file}: {error}"):
            damaged(name, change).setup()

    dropped = set()

    def nan_rows(t):
        t["latent"][[1, 5]] = float("nan")
        t["caption.context"][t["caption.index"][7]] = float("inf")  # item 7's caption, and every item sharing it
        dropped.update({1, 5}, (t["caption.index"] == t["caption.index"][7]).nonzero().flatten().tolist())

    data = damaged("nan", nan_rows)
    data.setup()
    assert len(data.train_set) == 24 - len(dropped) and bool(data.train_set.tensors["latent"].isfinite().all())
    assert f"precomputed train: skipped {len(dropped)} of 24 items holding non-finite values" in caplog.text

    _, datamodule, module = _parts([], tmp_path)
    big = module.autoencoder.encode_moments
    module.autoencoder.encode_moments = lambda x: big(x) * 1e6  # beyond float16's 65504
    with pytest.raises(ValueError, match=r"^precompute: the train split's \['latent'\] hold non-finite values as "
                                         r"float16; use dtype=float32"):
        write_precomputed(tmp_path / "f16", datamodule, module.autoencoder, module.conditioner, dtype="float16",
                          limit=4)


def test_missing_set_and_trainable_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is not a precomputed set: .*{MANIFEST} does not exist"):
        PrecomputedDataModule(tmp_path, channels=1, resolution=32, num_classes=10)
    _, datamodule, module = _parts(["conditioning.embedders.caption.trainable=true"], tmp_path)
    with pytest.raises(ValueError, match=r"\['caption'\] are trainable"):
        write_precomputed(tmp_path / "x", datamodule, module.autoencoder, module.conditioner, limit=4)


def test_wrong_source_shape_is_named(precomputed):
    out, _, _ = precomputed
    with pytest.raises(ValueError, match=r"data.resolution=64 \(set: 32\) do not match precomputed set"):
        PrecomputedDataModule(out, channels=1, resolution=64, num_classes=10)


@pytest.mark.slow
def test_precompute_cli_then_train(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "set"
    args = ["data=fashion_mnist_captions", "conditioning=text_minilm", "autoencoder=tiny_vae", "data.val_size=16"]
    res = subprocess.run([sys.executable, str(ROOT / "scripts/precompute.py"), f"out={out}", "limit=32",
                          "progress=false", *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"train on it with: data=precomputed data.path={out}" in res.stdout
    assert json.loads((out / MANIFEST).read_text())["splits"]["train"]["count"] == 32
    res = subprocess.run([sys.executable, "-m", "diffusion_train.train", "experiment=smoke", "data=precomputed",
                          f"data.path={out}", *args[1:3], "logger=csv", "callbacks.sample_grid.prompts=[a bag]",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()
    # another autoencoder: refused with a one-line error, exit code 1
    res = subprocess.run([sys.executable, "-m", "diffusion_train.train", "experiment=smoke", "data=precomputed",
                          f"data.path={out}", "conditioning=text_minilm", "autoencoder=tiny_vae",
                          "autoencoder.channels=[16,32,32]", "logger=csv", f"hydra.run.dir={tmp_path / 'run2'}"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 1 and "error: precomputed set" in res.stderr and "autoencoder." in res.stderr


def test_val_size_keeps_the_first_items_with_their_captions(precomputed):
    out, _, online = precomputed
    pre = PrecomputedDataModule(out, channels=1, resolution=32, num_classes=10, val_size=5)
    pre.setup()
    assert len(pre.val_set) == 5
    batch = pre.val_set[[0, 4]]
    assert batch["caption"] == online.val_set[[0, 4]]["caption"] and batch["caption.context"].shape[0] == 2


def test_a_failed_precompute_leaves_the_set_already_there_as_it_was(tmp_path):
    """A bad split name, or an encoder failing halfway: the set in out= keeps its files and manifest, and no staging
    folder is left behind."""
    from conftest import file_digest

    _, datamodule, module = _parts([], tmp_path)
    out = tmp_path / "set"
    write_precomputed(out, datamodule, module.autoencoder, module.conditioner, batch_size=4, limit=8)
    before = {p.name: file_digest(p) for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['vall'\]; valid: \['train', 'val'\]"):
        write_precomputed(out, datamodule, module.autoencoder, module.conditioner, splits=["train", "vall"], limit=4)
    calls = []
    encode = module.autoencoder.encode_moments

    def failing(images):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return encode(images)

    module.autoencoder.encode_moments = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        write_precomputed(out, datamodule, module.autoencoder, module.conditioner, batch_size=2, limit=4)
    assert {p.name: file_digest(p) for p in out.iterdir()} == before


def test_batches_name_their_source_items(tmp_path):
    """A batch's __key__ is the source item's (with data.classes, its index among all of Fashion-MNIST); a set
    without keys.json (written before it existed) names items by their place in the set."""
    import shutil

    _, online, module = _parts(["data.classes=[3,7]"], tmp_path)
    out = tmp_path / "set"
    write_precomputed(out, online, module.autoencoder, module.conditioner, batch_size=4, limit=6)
    pre = PrecomputedDataModule(out, channels=1, resolution=32, num_classes=10)
    pre.setup()
    source = online.val_set[[0, 4]]["__key__"]
    assert pre.val_set[[0, 4]]["__key__"] == source and source != ["val/0", "val/4"]
    assert pre.train_set[[5, 2]]["__key__"] == online.train_set[[5, 2]]["__key__"]
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "val.keys.json").unlink()
    pre = PrecomputedDataModule(old, channels=1, resolution=32, num_classes=10)
    pre.setup()
    assert pre.val_set[[0, 4]]["__key__"] == ["val/0", "val/4"]


def test_an_editing_set_stores_the_source_latents_and_trains_as_online(precomputed, tmp_path):
    """task=editing: the source images are encoded too (source_latent), so the set trains the task with the
    losses of online encoding; a set without them, or a task that needs the images, is refused before training."""
    cfg, datamodule, module = _parts(["data=fashion_mnist_edits", "data.val_size=8", "task=editing",
                                      "task.image_dropout=0.3"], tmp_path)
    out = tmp_path / "edits"
    manifest = write_precomputed(out, datamodule, module.autoencoder, module.conditioner, dtype="float32", limit=16,
                                 task=module.task)
    assert manifest["image_keys"] == ["source"]
    data = manifest["data"]
    pre = PrecomputedDataModule(out, data["channels"], data["resolution"], data["num_classes"])
    pre.check_provenance(module.autoencoder, module.conditioner, module.task)
    pre.setup()
    module.train()
    idx = [5, 0, 11, 3]
    a, b = datamodule.train_set[idx], pre.train_set[idx]
    assert "source" not in b and b["source_latent"].shape == b["latent"].shape
    for seed in range(3):
        torch.testing.assert_close(module.loss(b, torch.Generator().manual_seed(seed)),
                                   module.loss(a, torch.Generator().manual_seed(seed)), rtol=1e-5, atol=1e-6)
    plain, _, _ = precomputed
    with pytest.raises(PrecomputedMismatchError, match=r"has no latents of the task's \['source'\] images"):
        PrecomputedDataModule(plain, 1, 32, 10).check_provenance(module.autoencoder, module.conditioner, module.task)
    _, _, inpaint = _parts(["task=inpainting", "task.masked_image=encoded"], tmp_path)
    with pytest.raises(ValueError, match=r"task.masked_image=encoded .* \(use task.masked_image=zeroed\)"):
        PrecomputedDataModule(plain, 1, 32, 10).check_provenance(inpaint.autoencoder, inpaint.conditioner,
                                                                 inpaint.task)


def test_an_empty_split_is_written_empty_and_streams_and_dreambooth_are_refused(tmp_path):
    _, datamodule, module = _parts(["data.val_size=0"], tmp_path)
    manifest = write_precomputed(tmp_path / "noval", datamodule, module.autoencoder, module.conditioner, limit=8)
    assert manifest["splits"]["val"]["count"] == 0 and manifest["splits"]["val"]["latent_shape"] == [8, 8, 8]
    pre = PrecomputedDataModule(tmp_path / "noval", channels=1, resolution=32, num_classes=10)
    pre.setup()
    assert len(pre.train_set) == 8 and len(pre.val_set) == 0

    class Streaming:  # what a shard-streaming datamodule is to the writer: no in-memory sets
        def setup(self):
            pass

    with pytest.raises(ValueError, match="Streaming streams its data; scripts/precompute.py encodes the in-memory"):
        write_precomputed(tmp_path / "x", Streaming(), module.autoencoder, module.conditioner)
    from diffusion_train.finetune.dreambooth import DreamBoothDataModule

    dreambooth = DreamBoothDataModule(str(tmp_path / "subject"), "a photo of sks thing", resolution=16)  # its batches were read back unpaired (a KeyError first)
    with pytest.raises(ValueError, match="^data: DreamBoothDataModule cannot be precomputed: its batches pair"):
        write_precomputed(tmp_path / "x", dreambooth, module.autoencoder, module.conditioner)
    assert not (tmp_path / "x").exists()


def test_precompute_encodes_with_the_init_weights_of_the_run(tmp_path):
    """A fine-tune from init.path trains with the base run's encoders (here a random T5 tower and a random VAE, both
    kept in its checkpoint): the precomputed set is encoded with them too, and records their sha256 (the set was
    encoded with a fresh initialisation, and training's provenance kept the fresh weights' sha256 after the load)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR, load_script
    from diffusion_train.training.checkpointing import load_checkpoint

    base = tmp_path / "base"
    parts = ["data=fashion_mnist_captions", "data.batch_size=8", "data.val_size=8", "conditioning=t5_tiny",
             "autoencoder=tiny_vae", "autoencoder.channels=[8,8,8]", "callbacks.sample_grid.prompts=[a bag]"]
    train(compose_train(TINY + parts + ["trainer.max_steps=2"], base), base)
    state = load_checkpoint(base / "checkpoints" / "last.ckpt")["state_dict"]
    trained = {part: state[f"{key}._extra_state"]["sha256"] for part, key in
               (("caption", "conditioner.embedders.caption"), ("autoencoder", "autoencoder"))}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("precompute", overrides=[*parts, "model=unet_tiny", f"out={tmp_path / 'set'}", "limit=4",
                                               "splits=[train]",
                                               "progress=false", "device=cpu", "seed=1", f"init.path={base}",
                                               f"run_dir={tmp_path / 'unused'}"])
    manifest = load_script("precompute").precompute(cfg)
    assert manifest["embedders"]["caption"]["sha256"] == trained["caption"]
    assert manifest["autoencoder"]["sha256"] == trained["autoencoder"]
    fine_tune = build_module(compose_train(TINY + parts + ["seed=1"], tmp_path / "ft"))
    from diffusion_train.training.pretrained import load_pretrained

    load_pretrained(fine_tune, base, "raw")
    assert fine_tune.conditioner.embedders["caption"].provenance["sha256"] == trained["caption"]
    assert fine_tune.autoencoder.provenance["sha256"] == trained["autoencoder"]
