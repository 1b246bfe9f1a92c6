"""Captioned image folders, the common fine-tuning layout, decoded once and held in RAM::

    root/
      any/depth/a.png     an image: .png .jpg .jpeg .webp .bmp (any letter case)
      any/depth/a.txt     its optional caption: same folder and stem, ``caption_ext``; stripped
      cats/b.jpg          with ``class_subfolders=true`` the first-level folder names the class

Files and folders whose names start with "." are ignored (macOS ``._a.png`` forks, checkpoints of
notebooks). Each image is decoded with PIL (EXIF rotation applied, transparency flattened onto
white), converted to RGB (``channels=3``) or L (``channels=1``), and resampled with an antialiased
filter (Lanczos by default) so that its short side is ``resolution``, keeping the central square
(``center_crop=true``; the crop is fixed: the images are stored once, as uint8) or squashing the
whole image to a square (``center_crop=false``, aspect ratio not kept). RAM holds
N x channels x resolution^2 bytes: 10k RGB images at 256 take 2 GB.

An unreadable or corrupt image is skipped, counted (``num_skipped``, ``skipped``) and logged; a
missing or empty ``root`` and a folder with no readable image fail with the path named.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from diffusion_train.data.base import InMemoryImageDataModule

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CHUNK = 4096  # files per batch of pool tasks (bounds the number of pending futures)


def list_images(root: str | os.PathLike, caption_ext: str = ".txt") -> list[tuple[str, str | None]]:
    """``(image, caption file or None)`` paths relative to ``root``, sorted by image path (POSIX form).

    Symlinked folders are followed (each real folder once); hidden files and folders are skipped.
    """
    root = Path(root)
    found: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        names = {f for f in files if not f.startswith(".")}
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                caption = stem + caption_ext
                found.append(((rel / name).as_posix(), (rel / caption).as_posix() if caption in names else None))
    return sorted(found)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composites an image with transparency onto white; other images are returned as they are."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img)
    return img


def load_image(path: str | os.PathLike, resolution: int, channels: int = 3, center_crop: bool = True,
               resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """One image as uint8 (resolution, resolution, channels); raises on an unreadable file.

    The short side is resampled to ``resolution`` and the central square kept (``center_crop``, see
    :func:`fit_image`), or the whole image is resampled to a square (aspect ratio not kept).
    """
    if center_crop:
        return fit_image(Path(path).read_bytes(), resolution, resolution, channels, resample=resample)[0]
    with Image.open(path) as img:
        img.draft(None, (2 * resolution, 2 * resolution))
        out = np.asarray(_normalized(img, channels).resize((resolution, resolution), resample), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def fit_image(source: Any, height: int, width: int, channels: int = 3, rng: random.Random | None = None,
              resample: Image.Resampling = Image.Resampling.LANCZOS
              ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """An image (a path, a file object, or the file's bytes) resampled to cover ``height`` x ``width``
    with its aspect ratio kept, then cropped to it: centred, or at a random offset drawn from ``rng``
    (one resampling pass: the crop box is given to ``resize``; an image stored at the target size is
    only cropped). Large JPEGs are first reduced in the decoder (DCT scaling to at least twice the
    target size, as ``PIL.Image.thumbnail`` does). JPEG bytes without EXIF decode with simplejpeg
    (libjpeg-turbo straight into an array, the same pixels as PIL's, in about half the time).

    Returns (uint8 (height, width, channels), original (h, w) after EXIF rotation, crop (top, left) in
    the resampled image) -- the last two are SDXL's size and crop micro-conditioning.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    decoded = _decode_jpeg(source, height, width, channels) if isinstance(source, bytes) else None
    if decoded is not None:
        return _cover_crop(*decoded, height, width, channels, rng, resample)
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        w, h = img.size
        if min(w, h) <= 0:
            raise ValueError(f"empty image ({w}x{h})")
        original = (w, h) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)  # EXIF: turned 90 degrees
        reduce = max(height, width) / min(w, h)  # safe whichever way EXIF rotates the image
        img.draft(None, (math.ceil(2 * w * reduce), math.ceil(2 * h * reduce)))  # only JPEG decoders act on it
        return _cover_crop(_normalized(img, channels), original, height, width, channels, rng, resample)


def _resampled(side: float, scale: float) -> int:
    """A side of an image resampled by ``scale``, in whole pixels, rounded down (so a crop box stays inside)."""
    return math.floor(side * scale + 1e-9)


def mirrored_crop(original: tuple[int, int], crop: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """The (top, left) that :func:`fit_image` returns for a crop of an ``original`` (h, w) image, as the crop's
    mirror image (flipped left to right) has it."""
    scale = max(height / original[0], width / original[1])
    return crop[0], max(0, _resampled(original[1], scale) - width - crop[1])


def _cover_crop(image: Image.Image | np.ndarray, original: tuple[int, int], height: int, width: int,
                channels: int, rng: random.Random | None, resample: Image.Resampling
                ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """:func:`fit_image` of a decoded image (PIL, or an (h, w, channels) array; maybe DCT-reduced
    from its ``original`` (h, w))."""
    is_array = isinstance(image, np.ndarray)
    h, w = image.shape[:2] if is_array else (image.height, image.width)
    scale = max(width / w, height / h)
    crop_w, crop_h = width / scale, height / scale  # the crop in source pixels
    if rng is None:
        left, top = (w - crop_w) / 2, (h - crop_h) / 2
    else:  # a whole-pixel offset in the resampled image, the box inside the source (rounding a resampled side
        # up would put the last offset up to half a pixel outside it)
        left = rng.randint(0, max(0, _resampled(w, scale) - width)) / scale
        top = rng.randint(0, max(0, _resampled(h, scale) - height)) / scale
    if scale == 1:  # stored at the training size: a plain crop (whole pixels), no resampling
        left, top = round(left), round(top)
        out = (image[top:top + height, left:left + width] if is_array
               else np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8))
    else:
        if is_array:
            image = Image.fromarray(image[..., 0] if channels == 1 else image)
        out = np.asarray(image.resize((width, height), resample, box=(left, top, left + crop_w, top + crop_h)),
                         dtype=np.uint8)
    return (out[..., None] if out.ndim == 2 else out), original, (round(top * scale), round(left * scale))


def _decode_jpeg(data: bytes, height: int, width: int, channels: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """((h', w', channels) uint8, original (h, w)) of JPEG bytes with simplejpeg, DCT-scaled down while
    at least twice the size that covers height x width; None when it does not apply (not a JPEG, EXIF
    that may rotate it, CMYK, simplejpeg not installed), and PIL decodes instead."""
    if data[:2] != b"\xff\xd8" or data.find(b"Exif\0\0", 0, 1 << 16) >= 0:
        return None
    try:
        import simplejpeg

        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        cover = max(width / w, height / h)
        return simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY",
                                      min_height=min(h, math.ceil(2 * h * cover)),
                                      min_width=min(w, math.ceil(2 * w * cover))), (h, w)
    except (ImportError, ValueError):
        return None


def _normalized(img: Image.Image, channels: int) -> Image.Image:
    """EXIF rotation applied, 16-bit grayscale to 8 bits, transparency flattened, RGB or L."""
    if img.getexif().get(0x0112, 1) != 1:  # rotated or mirrored (exif_transpose would copy even when not)
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    mode = "RGB" if channels == 3 else "L"
    img = _flatten_alpha(img)
    return img if img.mode == mode else img.convert(mode)


class FolderCaptions:
    """``(index, label) -> caption`` of the split's ``index``-th image (sorted file order)."""

    def __init__(self, captions: list[str]):
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __call__(self, index: int, label: int) -> str:
        return self.captions[index]


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects Slurm / taskset CPU binding
    except AttributeError:
        return os.cpu_count() or 1


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images (with optional same-stem caption files) under ``root``; see the module docstring.

    Every batch has ``image``, ``label``, ``__key__`` and ``caption``; images without a caption file
    (or with an empty one) get ``default_caption`` (counted in ``num_missing_captions`` and logged),
    or fail the run when ``require_captions``. Labels are 0, or with ``class_subfolders`` the index
    of the first-level folder in ``class_names`` (sorted), whose count must equal ``num_classes``.

    Validation: ``val_size`` files drawn with ``split_seed`` from the sorted file list (a fixed
    seed, so runs with different training seeds validate on the same images); both splits keep
    sorted file order, which is the index order of ``captioner(split)``, ``train_files`` and
    ``val_files``. The split is drawn before decoding: an unreadable file leaves its split one short.
    Decoding runs on ``num_decode_workers`` threads (default: min(8, available CPUs)); the result
    does not depend on their number.
    """

    def __init__(self, root: str, resolution: int = 256, channels: int = 3, num_classes: int = 1,
                 batch_size: int = 32, class_subfolders: bool = False, caption_ext: str = ".txt",
                 default_caption: str = "", require_captions: bool = False, center_crop: bool = True,
                 resample: str = "lanczos", val_size: int = 64, split_seed: int = 0,
                 num_decode_workers: int | None = None, num_workers: int = 0, seed: int = 0,
                 val_batch_size: int | None = None):
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if resolution < 1:
            raise ValueError(f"data.resolution must be positive, got {resolution}")
        try:
            self.resample = Image.Resampling[str(resample).upper()]
        except KeyError:
            valid = ", ".join(r.name.lower() for r in Image.Resampling)
            raise ValueError(f"unknown data.resample {resample!r}; valid: {valid}") from None
        super().__init__(batch_size, channels, resolution, num_classes, num_workers, seed, val_batch_size)
        self.root = Path(root).expanduser()
        self.class_subfolders, self.caption_ext = class_subfolders, caption_ext
        self.default_caption, self.require_captions = default_caption, require_captions
        self.center_crop, self.val_size, self.split_seed = center_crop, val_size, split_seed
        self.num_decode_workers = num_decode_workers or min(8, _available_cpus())

        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"data.root: image folder {self.root} {what}")
        entries = list_images(self.root, caption_ext)
        if not entries:
            raise FileNotFoundError(f"data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        if require_captions:
            missing = [img for img, cap in entries if cap is None]
            if missing:
                raise FileNotFoundError(
                    f"data.require_captions: {len(missing)} image(s) have no caption file, e.g. "
                    f"{self.root / missing[0]} (expected {self.root / Path(missing[0]).with_suffix(caption_ext)})")
        self.class_names = self._class_names([img for img, _ in entries]) if class_subfolders else None
        self._class_index = {name: i for i, name in enumerate(self.class_names or [])}
        if not 0 <= val_size < len(entries):
            raise ValueError(f"data.val_size={val_size} must be in [0, {len(entries)}): {self.root} has "
                             f"{len(entries)} images and training needs at least one")
        val = set(np.random.default_rng(split_seed).choice(len(entries), val_size, replace=False).tolist())
        self._entries = {"train": [e for i, e in enumerate(entries) if i not in val],
                         "val": [e for i, e in enumerate(entries) if i in val]}
        self.train_files: list[str] = [img for img, _ in self._entries["train"]]
        self.val_files: list[str] = [img for img, _ in self._entries["val"]]
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of images that could not be decoded
        self.num_missing_captions = 0
        self._captions: dict[str, list[str]] | None = None

    def _class_names(self, images: list[str]) -> list[str]:
        loose = [img for img in images if "/" not in img]
        if loose:
            raise ValueError(f"data.class_subfolders=true needs every image in a class folder root/<class>/..., "
                             f"but {len(loose)} are directly in the root, e.g. {self.root / loose[0]}")
        names = sorted({img.split("/", 1)[0] for img in images})
        if len(names) != self.num_classes:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ValueError(f"data.num_classes={self.num_classes}, but {self.root} has {len(names)} class "
                             f"folders ({shown}): set data.num_classes={len(names)}")
        return names

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _label(self, image: str) -> int:
        return self._class_index[image.split("/", 1)[0]] if self.class_names else 0

    def _read_caption(self, caption: str | None) -> str | None:
        if caption is None:
            return None
        text = (self.root / caption).read_text(encoding="utf-8-sig", errors="replace").strip()
        return text or None

    def _decode_split(self, entries: list[tuple[str, str | None]], pool: ThreadPoolExecutor):
        n = len(entries)
        images = torch.empty(n, self.channels, self.resolution, self.resolution, dtype=torch.uint8)
        slots = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) view of the same memory

        def work(i: int):
            image, caption = entries[i]
            try:
                slots[i] = load_image(self.root / image, self.resolution, self.channels, self.center_crop,
                                      self.resample)
            except Exception as e:  # corrupt files raise a zoo of types (OSError, SyntaxError, ...)
                return False, f"{type(e).__name__}: {e}"
            try:
                return True, self._read_caption(caption)
            except OSError as e:
                return False, f"caption {caption}: {type(e).__name__}: {e}"

        kept, captions, labels, files = 0, [], [], []
        for start in range(0, n, _CHUNK):
            chunk = range(start, min(n, start + _CHUNK))
            for i, (ok, result) in zip(chunk, pool.map(work, chunk)):  # in file order
                image, caption_file = entries[i]
                if not ok:
                    self.skipped.append((str(self.root / image), result))
                    continue
                if result is None:
                    if self.require_captions:
                        raise ValueError(f"data.require_captions: caption file {self.root / caption_file} of "
                                         f"{self.root / image} is empty")
                    self.num_missing_captions += 1
                    result = self.default_caption
                if kept != i:
                    images[kept] = images[i]
                captions.append(result)
                labels.append(self._label(image))
                files.append(image)
                kept += 1
        return images[:kept], torch.tensor(labels, dtype=torch.long), captions, files

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        start = time.perf_counter()
        self.skipped, self.num_missing_captions = [], 0
        with ThreadPoolExecutor(self.num_decode_workers, thread_name_prefix="decode") as pool:
            tr_x, tr_y, tr_c, self.train_files = self._decode_split(self._entries["train"], pool)
            va_x, va_y, va_c, self.val_files = self._decode_split(self._entries["val"], pool)
        total = sum(len(v) for v in self._entries.values())
        if self.skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
            log.warning("image folder %s: skipped %d of %d images that could not be read: %s%s", self.root,
                        self.num_skipped, total, shown, " ..." if self.num_skipped > 5 else "")
        if len(tr_x) == 0:
            raise ValueError(f"no readable training images in {self.root}: {self.num_skipped} of {total} could not "
                             f"be decoded, e.g. {self.skipped[0][0]} ({self.skipped[0][1]})")
        if self.num_missing_captions:
            level = logging.INFO if self.num_missing_captions == len(tr_x) + len(va_x) else logging.WARNING
            log.log(level, "image folder %s: %d of %d images have no caption file (%s) or an empty one; they "
                    "use default_caption=%r", self.root, self.num_missing_captions, len(tr_x) + len(va_x),
                    f"*{self.caption_ext}", self.default_caption)
        log.info("image folder %s: %d train + %d val images at %dx%d in %.1f s", self.root, len(tr_x), len(va_x),
                 self.resolution, self.resolution, time.perf_counter() - start)
        self._captions = {"train": tr_c, "val": va_c}
        return tr_x, tr_y, va_x, va_y

    def captioner(self, split: str) -> FolderCaptions:
        """The captions of ``split`` in its sorted file order (available after :meth:`load`)."""
        if self._captions is None:
            raise RuntimeError("ImageFolderDataModule.captioner: call setup() first")
        return FolderCaptions(self._captions[split])
