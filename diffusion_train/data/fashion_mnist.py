"""Fashion-MNIST (Xiao et al. 2017): 60k train / 10k test 28x28 grayscale images in 10 classes."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_train.data.base import InMemoryImageDataModule

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: damaged gzip file ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def find_file(roots: list[Path], stem: str) -> Path | None:
    for root in roots:
        for sub in ("", "FashionMNIST/raw"):
            for name in (stem, stem + ".gz"):
                if (root / sub / name).is_file():
                    return root / sub / name
    return None


def load_split(split: str, root: str | os.PathLike | None = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of ``split`` ('train' or 'test')."""
    roots = [Path(root)] if root else [Path(DEBIAN_ROOT)]
    image_stem, label_stem = _FILES[split]
    if find_file(roots, image_stem) is None and download:
        import torchvision  # only needed to fetch the files when the machine is online

        torchvision.datasets.FashionMNIST(str(roots[0]), train=split == "train", download=True)
    paths = [find_file(roots, image_stem), find_file(roots, label_stem)]
    if None in paths:
        looked = ", ".join(str(r / s) for r in roots for s in ("", "FashionMNIST/raw"))
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({image_stem}[.gz]) not found in {looked}; install them with "
            f"'apt-get install dataset-fashion-mnist', set data.root=DIR to a folder holding the IDX files, "
            f"or set data.download=true to fetch them with torchvision")
    images, labels = (read_idx(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def to_resolution(images: Tensor, resolution: int, mode: str) -> Tensor:
    """28x28 uint8 -> resolution x resolution, by zero padding (background stays black) or bilinear resize."""
    size = images.shape[-1]
    if resolution == size:
        return images
    if mode == "pad":
        if resolution < size or (resolution - size) % 2:
            raise ValueError(f"data.resize=pad needs an even resolution >= {size}, got {resolution}")
        p = (resolution - size) // 2
        return F.pad(images, (p, p, p, p))
    if mode == "resize":
        out = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                            align_corners=False)
        return out.round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"unknown data.resize {mode!r}; valid: pad, resize")


class Captioner:
    """Caption of item i with label y: template i mod len(templates), filled with the class name."""

    def __init__(self, templates: list[str], names: list[str]):
        self.templates, self.names = templates, names

    def __call__(self, index: int, label: int) -> str:
        return self.templates[index % len(self.templates)].format(name=self.names[label])


class FashionMNISTDataModule(InMemoryImageDataModule):
    """Train on the 60k training images; validate on the first ``val_size`` test images.

    Files come from ``root`` (a folder with the IDX files, gzipped or not), else from the Debian
    package ``dataset-fashion-mnist``; ``download=true`` fetches them with torchvision.
    ``classes`` (e.g. ``[5, 7, 9]``) keeps the images of those classes only, in training and validation,
    under their own labels (a fine-tune on a subset). ``caption_templates`` (e.g. ``["a photo of a {name}"]``)
    adds a ``caption`` per image: item i
    uses template i mod len(templates) with its class name. ``channels=3`` repeats the grayscale
    image on three channels (a view: no extra memory), for autoencoders that take RGB.
    """

    def __init__(self, batch_size: int = 128, resolution: int = 32, resize: str = "pad", root: str | None = None,
                 download: bool = False, val_size: int = 1000, channels: int = 1, num_classes: int = 10,
                 num_workers: int = 0, seed: int = 0, val_batch_size: int | None = None,
                 caption_templates: list[str] | None = None, classes: list[int] | None = None):
        if channels not in (1, 3) or num_classes != 10:
            raise ValueError(f"Fashion-MNIST has num_classes=10 and channels=1 (or 3: the grayscale image on "
                             f"each channel), got num_classes={num_classes}, channels={channels}")
        super().__init__(batch_size, channels, resolution, num_classes, num_workers, seed, val_batch_size)
        self.root, self.download, self.resize, self.val_size = root, download, resize, val_size
        self.caption_templates = list(caption_templates) if caption_templates else None
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and (not self.classes or any(not 0 <= c < 10 for c in self.classes)):
            raise ValueError(f"data.classes: give Fashion-MNIST class indices 0..9, got {classes}")
        for template in self.caption_templates or []:
            if "{name}" not in template:
                raise ValueError(f"data.caption_templates: {template!r} has no {{name}} placeholder")

    def captioner(self, split: str):
        if not self.caption_templates:
            return None
        return Captioner(self.caption_templates, [c.lower() for c in CLASSES])

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tr_x, tr_y = load_split("train", self.root, self.download)
        te_x, te_y = load_split("test", self.root, self.download)
        if self.classes is not None:
            wanted = torch.tensor(self.classes)
            tr_ids, te_ids = (torch.isin(y, wanted).nonzero().flatten() for y in (tr_y, te_y))
            (tr_x, tr_y), (te_x, te_y) = (tr_x[tr_ids], tr_y[tr_ids]), (te_x[te_ids], te_y[te_ids])
            self.subset_ids = (tr_ids, te_ids[: self.val_size])
        te_x, te_y = te_x[: self.val_size], te_y[: self.val_size]
        tr_x, te_x = (to_resolution(x, self.resolution, self.resize).expand(-1, self.channels, -1, -1)
                      for x in (tr_x, te_x))
        return tr_x, tr_y, te_x, te_y


EDITS = {  # instruction -> the edit, on (B, C, H, W) images
    "flip it left to right": lambda x: x.flip(-1),
    "turn it upside down": lambda x: x.flip(-2),
    "invert the colors": lambda x: -x,
    "rotate it a quarter turn": lambda x: x.rot90(1, dims=(-2, -1)),
}


class EditBatches:
    """Instruction-editing pairs from image batches: image i's source is the image, its target (``image``) the
    source edited by instruction ``i mod len(EDITS)``, given as its ``caption``."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]) -> dict:
        batch = self.images[indices]
        names = list(EDITS)
        ops = [i % len(names) for i in indices]
        source = batch["image"]
        target = torch.stack([EDITS[names[op]](img[None])[0] for op, img in zip(ops, source)])
        return {**batch, "image": target, "source": source, "caption": [names[op] for op in ops]}


class FashionMNISTEditsDataModule(FashionMNISTDataModule):
    """Fashion-MNIST as an instruction-editing dataset (``task=editing``): each image is the source, the target is it
    flipped left to right, turned upside down, colour-inverted or rotated a quarter turn, and the caption says which
    (:data:`EDITS`). The edits are exact, so a model's edit can be checked against the right answer."""

    def make_sets(self):
        train, val = super().make_sets()
        return EditBatches(train), EditBatches(val)
