"""Decoding one webdataset sample: image fitting (square, or aspect-ratio buckets), captions, labels,
precomputed arrays, metadata and filters; a skip reason when the sample is unusable."""

from __future__ import annotations

import io
import json
import math
import random
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from diffusion_train.data.folder import _normalized, fit_image, mirrored_crop
from diffusion_train.data.tar_io import load_array

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class Skip(str):
    """A skip reason (``undecodable_image``, ``bad_label``, ...) with what was wrong, for the log."""

    detail: str

    def __new__(cls, reason: str, detail: str = "") -> Skip:
        self = super().__new__(cls, reason)
        self.detail = detail
        return self


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def original_size(meta: dict, stored: tuple[int, int]) -> tuple:
    """(h, w) of the original image: the json's ``original_height``/``original_width`` when the shard holds a resized
    copy (make_shards ``short_side``, img2dataset), else the stored image's ``stored``."""
    given = (meta.get("original_height"), meta.get("original_width"))
    known = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in given)
    return given if known else stored


def _is_number(value: Any) -> bool:
    """A JSON number other than NaN (or a boolean flag: 0 or 1)."""
    return isinstance(value, (int, float)) and not math.isnan(value)


def aspect_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about ``resolution``^2 pixels (never more), both sides multiples of
    ``step``, aspect ratios up to ``max_aspect`` either way; the square one included when it fits."""
    if resolution % step:
        raise ValueError(f"data.resolution={resolution} is not a multiple of data.bucket_step={step}")
    area, buckets = resolution * resolution, set()
    for width in range(step, int(resolution * max_aspect ** 0.5) + 1, step):
        height = area // width // step * step
        if height and max(width / height, height / width) <= max_aspect:
            buckets |= {(height, width), (width, height)}
    return sorted(buckets)


class SampleDecoder:
    """Raw sample -> ``{"image": uint8 (C, H, W), "label", "caption", "__key__", ...}``, or a skip reason
    (a :class:`Skip`, a ``str`` that also says what was wrong).

    The image (first of ``image_keys`` present) is resampled to cover ``resolution`` x ``resolution``
    and cropped to it (``resize="crop"``: centred, or at a random offset with ``random_crop``), or
    centred on a black square (``resize="pad"``, for small images such as Fashion-MNIST's 28x28 in
    32x32). With ``buckets`` (a list of (height, width)) it is fitted to the bucket whose aspect ratio
    is closest to its own instead (aspect-ratio bucketing; the stream batches each shape
    separately). Both modes decode alike: EXIF rotation applied, transparency flattened onto white,
    16-bit grayscale scaled to 8 bits. ``flip`` mirrors it with probability 1/2. ``caption_key`` is
    ``txt`` or ``json:<field>`` (a string; both are stripped); ``label_key`` (``cls``) is required unless
    null, and its label must be an integer in [0, ``num_classes``) (``bad_label`` otherwise; any
    non-negative integer when ``num_classes`` is None). The json member must be an object
    (``bad_json``). Filters (reasons ``filtered_*``): ``min_image_size`` (short side of the original, as
    ``image:original_size`` gives it), ``max_caption_length`` (characters) and ``max_scores``
    (``{"punsafe": 0.5}``: the sample's json field must be <= the bound, when present; ``bad_punsafe`` when it is
    not a number).
    ``tensors`` maps batch keys to members holding precomputed arrays (``.npy``, or ``.pth`` read with
    ``weights_only``), e.g. ``{latent: latent.npy, caption.context: t5.npy, caption.mask: t5mask.npy}``
    (see ``scripts/precompute.py`` for what the keys mean); with a ``latent`` the image is optional.
    ``metadata`` maps batch keys to float32 tensors from the sample's json (``{aesthetic: aesthetic}``,
    a finite number or a list of them; ``missing_<field>`` without it, ``bad_<field>`` when it is not one)
    or from the image (``image:original_size`` and ``image:crop_top_left``, (h, w) of the original after
    EXIF rotation -- the json's ``original_height``/``original_width`` when present, as make_shards and
    img2dataset write them for resized copies -- and (top, left) of the crop, (0, 0) when padded: SDXL's
    micro-conditioning).
    """

    def __init__(self, resolution: int, channels: int = 3, image_keys: Sequence[str] = IMAGE_KEYS,
                 label_key: str | None = "cls", caption_key: str | None = "txt", flip: bool = False,
                 min_image_size: int = 0, max_caption_length: int | None = None,
                 max_scores: dict[str, float] | None = None, resize: str = "crop",
                 tensors: dict[str, str] | None = None, random_crop: bool = False,
                 buckets: Sequence[Sequence[int]] | None = None, metadata: dict[str, str] | None = None,
                 num_classes: int | None = None):
        if resize not in ("crop", "pad"):
            raise ValueError(f"data.resize must be crop or pad, got {resize!r}")
        if buckets and resize != "crop":
            raise ValueError("data.buckets needs data.resize=crop")
        augment = [name for name, on in (("flip", flip), ("random_crop", random_crop)) if on]
        if augment and "latent" in (tensors or {}):
            raise ValueError(f"data.{' and data.'.join(augment)} would change the image but not the stored latents "
                             f"(data.tensors.latent) that training uses; turn it off, or store latents of augmented "
                             f"images")
        self.resize, self.tensors, self.random_crop = resize, dict(tensors or {}), random_crop
        self.resolution, self.channels, self.image_keys = resolution, channels, tuple(image_keys)
        self.label_key, self.caption_key, self.flip = label_key, caption_key, flip
        self.num_classes = num_classes
        self.min_image_size, self.max_caption_length = min_image_size, max_caption_length
        self.max_scores, self.metadata = dict(max_scores or {}), dict(metadata or {})
        self.buckets = [(int(h), int(w)) for h, w in buckets or []]
        self._log_aspects = [math.log(w / h) for h, w in self.buckets]

    @property
    def draws_random(self) -> bool:
        """Whether decoding draws random numbers (random crop, flip)."""
        return self.flip or self.random_crop

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is fitted to: its bucket, or the square."""
        if not self.buckets:
            return self.resolution, self.resolution
        aspect = math.log(width / height)
        return self.buckets[min(range(len(self.buckets)), key=lambda i: abs(self._log_aspects[i] - aspect))]

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any] | str:
        ext = next((k for k in self.image_keys if k in sample), None)
        arrays = {}
        for key, member in self.tensors.items():
            if member not in sample:
                return f"missing_{member}"
            try:
                arrays[key] = load_array(sample[member], member)
            except Exception as e:  # noqa: BLE001 - an unreadable array makes the sample unusable
                return Skip(f"bad_{member}", _error(e))
            if isinstance(arrays[key], torch.Tensor) and arrays[key].is_floating_point() \
                    and not bool(arrays[key].isfinite().all()):
                return Skip(f"bad_{member}", "non-finite values")  # would make its batch's step non-finite
        if ext is None and "latent" not in arrays:
            return "missing_image"
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError as e:  # UnicodeDecodeError included
                return Skip("bad_json", _error(e))
            if not isinstance(meta, dict):
                return Skip("bad_json", f"a JSON {type(meta).__name__}, not an object")
        for field, bound in self.max_scores.items():
            value = meta.get(field)
            if value is None:
                continue
            if not _is_number(value):
                return Skip(f"bad_{field}", f"json {field}={value!r:.40} is not a number")
            if value > bound:
                return f"filtered_{field}"
        for key, field in self.metadata.items():
            if field.startswith("image:"):
                continue
            if meta.get(field) is None:
                return f"missing_{field}"
            try:
                arrays[key] = torch.tensor(meta[field], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                return Skip(f"bad_{field}", f"json {field}={meta[field]!r:.40} is not a number or a list of them ({e})")
            if not bool(torch.isfinite(arrays[key]).all()):  # JSON's NaN and Infinity parse: not a condition
                return Skip(f"bad_{field}", f"json {field}={meta[field]!r:.40} is not finite")
        caption = None
        if self.caption_key:
            if self.caption_key.startswith("json:"):
                caption = meta.get(self.caption_key[5:])
                if caption is not None and not isinstance(caption, str):
                    return Skip("bad_caption", f"json {self.caption_key[5:]}={caption!r:.40} is not a string")
                caption = caption.strip() if caption is not None else None
            elif self.caption_key in sample:
                caption = sample[self.caption_key].decode("utf-8", errors="replace").strip()
            if caption is None:
                return "missing_caption"
            if self.max_caption_length is not None and len(caption) > self.max_caption_length:
                return "filtered_caption_length"
        label = 0
        if self.label_key:
            if self.label_key not in sample:
                return "missing_label"
            try:
                label = int(sample[self.label_key].decode().strip())
            except ValueError:  # UnicodeDecodeError included
                return Skip("bad_label", f"{self.label_key} {sample[self.label_key][:20]!r} is not an integer")
            if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                valid = f"[0, num_classes={self.num_classes})" if self.num_classes is not None else "[0, inf)"
                return Skip("bad_label", f"label {label} is outside {valid}")
        out = {"label": label, "__key__": sample["__key__"], **arrays}
        if caption is not None:
            out["caption"] = caption
        if ext is None:  # precomputed latents only
            return "missing_image" if any(f.startswith("image:") for f in self.metadata.values()) else out
        try:
            if self.min_image_size or self.buckets:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    width, height = img.size
                    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF: stored rotated by 90 degrees
                        width, height = height, width
                if min(original_size(meta, (height, width))) < self.min_image_size:
                    return "filtered_image_size"
            if self.resize == "pad":
                (array, size), crop = self._pad(sample[ext]), (0, 0)
            else:
                height, width = self.target_size(height, width) if self.buckets else (self.resolution,) * 2
                array, size, crop = fit_image(sample[ext], height, width, self.channels,
                                              rng if self.random_crop else None)
        except Exception as e:  # noqa: BLE001 - any decoder failure makes the sample unusable
            return Skip("undecodable_image", _error(e))
        if array is None:
            return Skip("image_larger_than_resolution", f"{size[0]}x{size[1]} (h x w) does not fit in "
                                                        f"{self.resolution}x{self.resolution} (resize=pad)")
        image = torch.from_numpy(array if array.flags.writeable else array.copy())  # (H, W, C)
        if self.flip and rng.random() < 0.5:
            image = image.flip(1)
            if self.resize == "crop":
                crop = mirrored_crop(size, crop, image.shape[0], image.shape[1])
        out["image"] = image.permute(2, 0, 1)  # (C, H, W) in channels-last memory: collate stacks it fast
        for key, field in self.metadata.items():
            if field == "image:original_size":
                out[key] = torch.tensor(original_size(meta, size), dtype=torch.float32)
            elif field == "image:crop_top_left":
                out[key] = torch.tensor(crop, dtype=torch.float32)
        return out

    def _pad(self, data: bytes) -> tuple[np.ndarray | None, tuple[int, int]]:
        """(the image centred on a black square, or None when larger; its (h, w)), decoded as
        :func:`~diffusion_train.data.folder.fit_image` decodes."""
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(_normalized(img, self.channels), dtype=np.uint8)
        array = array[..., None] if array.ndim == 2 else array
        h, w = array.shape[:2]
        if h > self.resolution or w > self.resolution:
            return None, (h, w)
        top, left = (self.resolution - h) // 2, (self.resolution - w) // 2
        out = np.zeros((self.resolution, self.resolution, array.shape[2]), dtype=np.uint8)
        out[top:top + h, left:left + w] = array
        return out, (h, w)
