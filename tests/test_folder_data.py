"""The captioned image-folder data module on real files: decoding, crops, captions, labels, bad input."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from conftest import TINY, compose_train
from diffusion_train.data.folder import ImageFolderDataModule, fit_image, list_images, load_image
from diffusion_train.train import train
from diffusion_train.training.checkpointing import load_checkpoint

RED, WHITE, BLACK, BLUE = (255, 0, 0), (255, 255, 255), (0, 0, 0), (0, 0, 255)
# caption of each image that has a caption file (stored with stray whitespace: captions are stripped)
CAPTIONS = {"wide.png": "four stripes", "gray.png": "a gray square", "nested/deeper/tall.png": "white over black",
            "nested/photo.jpg": "a noisy photo", "upper.JPG": "an upper-case suffix"}
READABLE = ["gray.png", "nested/deeper/tall.png", "nested/photo.jpg", "nested/plain.bmp", "nested/ww.webp",
            "palette.png", "transparent.png", "upper.JPG", "wide.png"]


def stripes(width: int, height: int, colors, vertical: bool = True) -> Image.Image:
    """Equal bands of ``colors``, left to right (``vertical``) or top to bottom."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    n = len(colors)
    for i, c in enumerate(colors):
        if vertical:
            img[:, i * width // n:(i + 1) * width // n] = c
        else:
            img[i * height // n:(i + 1) * height // n] = c
    return Image.fromarray(img)


def make_folder(root: Path) -> Path:
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    stripes(40, 20, [RED, WHITE, BLACK, BLUE]).save(root / "wide.png")                      # RGB, 2:1
    stripes(20, 50, [WHITE, BLACK], vertical=False).save(root / "nested/deeper/tall.png")   # RGB, 2:5
    Image.new("L", (30, 30), 100).save(root / "gray.png")                                   # L
    Image.new("RGBA", (24, 18), (10, 20, 30, 0)).save(root / "transparent.png")             # RGBA, see-through
    pal = Image.new("P", (17, 23), 1)
    pal.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    pal.save(root / "palette.png")                                                          # P
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    noisy.save(root / "nested/photo.jpg", quality=90)
    noisy.save(root / "nested/ww.webp")
    noisy.convert("L").save(root / "nested/plain.bmp")
    Image.new("RGB", (9, 9), BLUE).save(root / "upper.JPG")
    (root / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / ".hidden.png").write_bytes(b"not an image")            # hidden: not listed, not counted
    (root / ".cache" / "x.png").write_bytes(b"not an image")
    (root / "notes.md").write_text("not an image")
    (root / "orphan.txt").write_text("a caption without an image")
    for name, text in CAPTIONS.items():
        (root / name).with_suffix(".txt").write_text(f"  {text}\n\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def dm(folder):
    dm = ImageFolderDataModule(str(folder), resolution=16, batch_size=4, val_size=0, num_decode_workers=2)
    dm.setup()
    return dm


def image_of(dm: ImageFolderDataModule, name: str) -> torch.Tensor:
    return dm.train_set.images[dm.train_files.index(name)]


def test_listing_is_sorted_recursive_and_skips_hidden_files(folder):
    entries = list_images(folder)
    assert [img for img, _ in entries] == sorted(READABLE + ["corrupt.png"])
    assert dict(entries)["wide.png"] == "wide.txt" and dict(entries)["nested/deeper/tall.png"] == "nested/deeper/tall.txt"
    assert dict(entries)["palette.png"] is None


def test_batches_have_the_documented_keys_shapes_and_ranges(dm):
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "caption", "__key__"}
    img = batch["image"]
    assert img.shape == (4, 3, 16, 16) and img.dtype == torch.float32
    assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0] * 4
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    assert len(batch["caption"]) == 4 and all(k.startswith("train/") for k in batch["__key__"])
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape == (len(READABLE), 3, 16, 16)


def test_captions_belong_to_their_images(dm):
    assert dm.train_files == READABLE  # sorted order, the corrupt file left out
    assert dm.num_missing_captions == len(READABLE) - len(CAPTIONS)
    captioner = dm.captioner("train")
    for i, name in enumerate(dm.train_files):
        assert captioner(i, 0) == CAPTIONS.get(name, "")
    # through the loader: each key's caption and pixels are those of the file at that index
    loader = iter(dm.train_dataloader())
    for batch in (next(loader), next(loader)):
        for key, caption, image in zip(batch["__key__"], batch["caption"], batch["image"]):
            i = int(key.split("/")[1])
            assert caption == CAPTIONS.get(dm.train_files[i], "")
            torch.testing.assert_close(image, dm.train_set.images[i].float() / 127.5 - 1)


def test_resize_and_center_crop_keep_the_layout(dm):
    # the central square of red|white|black|blue is white|black (Lanczos rings a little at the edges)
    wide = image_of(dm, "wide.png")
    assert (wide[:, :, :8] >= 240).all() and (wide[:, :, 1:7] == 255).all()
    assert (wide[:, :, 8:] <= 10).all() and (wide[:, :, 9:15] == 0).all()
    tall = image_of(dm, "nested/deeper/tall.png")  # white over black, cropped around the middle
    assert (tall[:, :8] >= 240).all() and (tall[:, 1:7] == 255).all() and (tall[:, 9:] == 0).all()
    # the same as resizing the short side to 16, then cutting out the central square
    for name, size, crop in (("wide.png", (32, 16), np.s_[:, 8:24]), ("nested/deeper/tall.png", (16, 40), np.s_[12:28])):
        with Image.open(dm.root / name) as img:
            reference = np.asarray(img.resize(size, Image.Resampling.LANCZOS))[crop]
        assert np.array_equal(image_of(dm, name).permute(1, 2, 0).numpy(), reference), name
    assert (image_of(dm, "gray.png") == 100).all()  # grayscale repeated on 3 channels
    assert (image_of(dm, "transparent.png") == 255).all()  # transparency flattened onto white
    palette = image_of(dm, "palette.png")
    assert palette[:, 0, 0].tolist() == [0, 128, 255] and (palette == palette[:, :1, :1]).all()
    assert (image_of(dm, "upper.JPG")[2] >= 240).all()  # the upper-case .JPG is read (blue)
    # the jpeg is close to its source, center-cropped and resized the same way (lossy, so loosely)
    ref = load_image(dm.root / "nested/ww.webp", 16)
    photo = image_of(dm, "nested/photo.jpg").permute(1, 2, 0).numpy()
    assert np.abs(photo.astype(int) - ref.astype(int)).mean() < 12


def test_squash_instead_of_crop_keeps_the_whole_image(folder):
    out = load_image(folder / "wide.png", 16, center_crop=False)
    assert out.shape == (16, 16, 3)
    assert np.abs(out[:, :3].astype(int) - RED).max() <= 2 and np.abs(out[:, -3:].astype(int) - BLUE).max() <= 2


def test_grayscale_module(folder):
    dm = ImageFolderDataModule(str(folder), resolution=8, channels=1, val_size=0, batch_size=2)
    dm.setup()
    assert dm.train_set.images.shape == (len(READABLE), 1, 8, 8)
    assert (image_of(dm, "gray.png") == 100).all() and (image_of(dm, "transparent.png") == 255).all()
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 8, 8)


def test_corrupt_image_is_skipped_counted_and_logged(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusion_train.data.folder"):
        dm = ImageFolderDataModule(str(folder), resolution=8, val_size=0)
        dm.setup()
    assert dm.num_skipped == 1 and dm.skipped[0][0] == str(folder / "corrupt.png")
    assert "corrupt.png" not in dm.train_files and len(dm.train_set) == len(READABLE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 1 of 10" in m and "corrupt.png" in m for m in warnings), warnings
    assert any("have no caption file" in m for m in warnings), warnings


def test_validation_split_is_seeded_sorted_and_captioned(folder):
    def make(**kw):
        dm = ImageFolderDataModule(str(folder), resolution=8, val_size=3, batch_size=2, **kw)
        dm.setup()
        return dm

    a, b, c = make(), make(seed=7, num_decode_workers=1), make(split_seed=1)
    assert a.val_files == b.val_files and a.train_files == b.train_files  # the training seed keeps the split
    assert torch.equal(a.train_set.images, b.train_set.images)  # decoding threads do not change the result
    assert (a.val_files, a.train_files) != (c.val_files, c.train_files)
    for dm in (a, c):
        assert dm.val_files == sorted(dm.val_files) and dm.train_files == sorted(dm.train_files)
        assert set(dm.val_files).isdisjoint(dm.train_files)
        assert sorted(dm.val_files + dm.train_files) == READABLE
        assert len(dm.val_set) == len(dm.val_files) and len(dm.train_set) == len(dm.train_files)
        val = list(dm.val_dataloader())
        keys = [k for batch in val for k in batch["__key__"]]
        assert sorted(keys) == [f"val/{i}" for i in range(len(dm.val_files))]
        for batch in val:
            for key, caption in zip(batch["__key__"], batch["caption"]):
                assert caption == CAPTIONS.get(dm.val_files[int(key.split("/")[1])], "")
        train_captions = dm.captioner("train")
        assert [train_captions(i, 0) for i in range(len(dm.train_files))] == [
            CAPTIONS.get(f, "") for f in dm.train_files]


def test_class_subfolders_give_labels(tmp_path):
    for path in ("cats/a.png", "cats/b.png", "dogs/c.png", "dogs/old/d.png", "emus/e.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), WHITE).save(tmp_path / path)
    dm = ImageFolderDataModule(str(tmp_path), resolution=8, num_classes=3, class_subfolders=True, val_size=0,
                               batch_size=5, default_caption="a thing")
    dm.setup()
    assert dm.class_names == ["cats", "dogs", "emus"]
    assert dm.train_files == ["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/old/d.png", "emus/e.png"]
    assert dm.train_set.labels.tolist() == [0, 0, 1, 1, 2]
    batch = next(iter(dm.train_dataloader()))
    for key, label, caption in zip(batch["__key__"], batch["label"], batch["caption"]):
        assert int(label) == dm.train_set.labels[int(key.split("/")[1])] and caption == "a thing"
    with pytest.raises(ValueError, match="data.num_classes=1, but .* has 3 class folders .*set data.num_classes=3"):
        ImageFolderDataModule(str(tmp_path), resolution=8, class_subfolders=True, val_size=0)
    Image.new("RGB", (12, 10), WHITE).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolderDataModule(str(tmp_path), resolution=8, num_classes=3, class_subfolders=True, val_size=0)
    # without class folders every label is 0
    flat = ImageFolderDataModule(str(tmp_path), resolution=8, num_classes=4, val_size=0)
    flat.setup()
    assert flat.train_set.labels.tolist() == [0] * 6


def test_missing_or_empty_root_fails_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        ImageFolderDataModule(str(missing), resolution=8)
    assert str(missing) in str(info.value)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolderDataModule(str(tmp_path / "file.png"), resolution=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("a caption")
    with pytest.raises(FileNotFoundError, match="no images") as info:
        ImageFolderDataModule(str(empty), resolution=8)
    assert str(empty) in str(info.value)


def test_no_readable_image_fails_naming_the_path(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "b.jpg").write_bytes(b"")
    dm = ImageFolderDataModule(str(tmp_path), resolution=8, val_size=0)
    with pytest.raises(ValueError, match="no readable training images") as info:
        dm.setup()
    assert str(tmp_path) in str(info.value) and dm.num_skipped == 2


def test_require_captions_names_the_file(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="require_captions") as info:
        ImageFolderDataModule(str(folder), resolution=8, require_captions=True)
    assert str(folder / "corrupt.png") in str(info.value)  # the first image without a caption
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    dm = ImageFolderDataModule(str(tmp_path), resolution=8, require_captions=True, val_size=0)
    with pytest.raises(ValueError, match="empty") as info:
        dm.setup()
    assert str(tmp_path / "a.txt") in str(info.value)


def test_bad_settings_fail_at_construction(folder):
    with pytest.raises(ValueError, match="val_size"):
        ImageFolderDataModule(str(folder), resolution=8, val_size=10)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(str(folder), resolution=8, channels=4)
    with pytest.raises(ValueError, match="resample"):
        ImageFolderDataModule(str(folder), resolution=8, resample="sharpest")


def test_config_needs_a_root(tmp_path):
    with pytest.raises(MissingMandatoryValue, match="data.root"):
        train(compose_train(TINY + ["data=image_folder"], tmp_path / "run"), tmp_path / "run")


def test_text_to_image_training_on_a_folder(folder, tmp_path):
    run = tmp_path / "run"
    cfg = compose_train(TINY + ["data=image_folder", f"data.root={folder}", "data.resolution=16", "data.batch_size=4",
                                "data.val_size=2", "conditioning=text_minilm", "trainer.max_steps=2",
                                "callbacks.sample_grid.prompts=[four stripes]"], run)
    trainer = train(cfg, run)
    assert trainer.global_step == 2
    assert trainer.lightning_module.backbone.context_dim == 384
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 2


def _jpeg(array: np.ndarray, exif_orientation: int | None = None) -> bytes:
    img = Image.fromarray(array)
    buf = io.BytesIO()
    if exif_orientation is None:
        img.save(buf, format="JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size", [(24, 32), (40, 30)])  # stored at the target height (crop only); resampled
def test_fast_jpeg_decoding_gives_the_pixels_of_pil(size):
    data = _jpeg(_photo(*size))
    fast = fit_image(data, 24, 24)  # bytes: simplejpeg
    slow = fit_image(io.BytesIO(data), 24, 24)  # a file object: PIL
    assert np.array_equal(fast[0], slow[0]) and fast[1:] == slow[1:] == (size, fast[2])
    gray = fit_image(data, 16, 16, channels=1)[0].astype(int)  # the JPEG's luma vs PIL's RGB -> L: rounding apart
    assert gray.shape == (16, 16, 1) and np.abs(gray - fit_image(io.BytesIO(data), 16, 16, channels=1)[0]).max() <= 2


def test_large_jpegs_decode_reduced_and_report_their_original_size():
    data = _jpeg(_photo(400, 800))
    out, original, crop = fit_image(data, 32, 32)
    assert out.shape == (32, 32, 3) and original == (400, 800) and crop == (0, 16)
    reference = fit_image(io.BytesIO(data), 32, 32)[0]  # PIL's draft reduces the same way
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 2


def test_jpegs_with_exif_rotation_are_turned_upright():
    upright = _photo(40, 20)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # 20x40 stored, EXIF 6 says: turn 90 clockwise
    out, original, _ = fit_image(_jpeg(stored, exif_orientation=6), 40, 20)
    assert original == (40, 20) and out.shape == (40, 20, 3)
    assert np.abs(out.astype(int) - upright.astype(int)).mean() < 6
