"""Offline data: Fashion-MNIST (Debian package) and WikiText-2 (shared/data)."""

from kompakt.data.fashion_mnist import CLASSES, fashion_mnist, fashion_mnist_loader
from kompakt.data.wikitext import wikitext2_text, wikitext2_windows

__all__ = [
    "CLASSES",
    "fashion_mnist",
    "fashion_mnist_loader",
    "wikitext2_text",
    "wikitext2_windows",
]
