"""WikiText-2 (word-level release) tokenized and cut into fixed token windows.

``valid`` is for calibration, ``test`` for evaluation. The folder defaults to
``shared/data/wikitext-2`` beside the repository; override it with the ``root`` argument or the
``KOMPAKT_WIKITEXT2`` environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kompakt.errors import KompaktError

ROOT_ENV = "KOMPAKT_WIKITEXT2"
SPLITS = {"valid": "valid.txt", "test": "test.txt"}


def default_root() -> Path:
    """``../shared/data/wikitext-2`` relative to the repository that holds this package."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"


def wikitext2_text(split: str, root: str | os.PathLike[str] | None = None) -> str:
    """The raw text of one split."""
    if split not in SPLITS:
        raise KompaktError(
            f"WikiText-2 has no split {split!r} here; use 'valid' (calibration) or 'test' (evaluation)"
        )
    folder = Path(root or os.environ.get(ROOT_ENV) or default_root())
    file = folder / SPLITS[split]
    if not file.is_file():
        raise KompaktError(
            f"{file}: missing; pass root= or set {ROOT_ENV} to the folder holding "
            "WikiText-2's valid.txt and test.txt"
        )
    return file.read_text(encoding="utf-8")


def wikitext2_windows(
    tokenizer,
    split: str = "test",
    window: int = 512,
    max_windows: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Token ids ``[n, window]``: the split tokenized as one stream, cut into non-overlapping windows.

    The trailing partial window is dropped; ``max_windows`` keeps only the first ones.
    """
    if window < 1:
        raise KompaktError(f"window must be a positive number of tokens, got {window}")
    ids = tokenizer(wikitext2_text(split, root), add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise KompaktError(
            f"WikiText-2 {split}: {len(ids)} tokens is less than one window of {window}"
        )
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)
