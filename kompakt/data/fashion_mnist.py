"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, gzipped)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from kompakt.errors import KompaktError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "KOMPAKT_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (unsigned-byte data) into a numpy array."""
    if not path.is_file():
        raise KompaktError(
            f"{path}: missing; install the Debian package dataset-fashion-mnist "
            "(apt-get install -y dataset-fashion-mnist) or pass root= / set "
            f"{ROOT_ENV} to a folder holding the IDX .gz files"
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise KompaktError(
            f"{path}: not a readable gzip file ({e}); reinstall dataset-fashion-mnist"
        ) from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise KompaktError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise KompaktError(
            f"{path}: truncated ({body.size} values, header says {int(np.prod(dims))})"
        )
    return body.reshape(dims)


def fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: images float32 ``[N, 1, 28, 28]`` normalised, labels int64 ``[N]``."""
    if split not in FILES:
        raise KompaktError(f"Fashion-MNIST has no split {split!r}; use one of: {', '.join(FILES)}")
    folder = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    image_file, label_file = (folder / name for name in FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise KompaktError(
            f"{image_file}: shape {images.shape} does not match {label_file} shape {labels.shape}"
        )
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_loader(
    split: str = "train",
    batch_size: int = 128,
    shuffle: bool | None = None,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> DataLoader:
    """A DataLoader over :func:`fashion_mnist` (shuffled with ``seed`` for ``train`` by default)."""
    images, labels = fashion_mnist(split, root)
    shuffle = split == "train" if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, generator=generator
    )
