"""kompakt: compress trained PyTorch models and ship them to phones and edge boards.

The public surface here is small: ``save``, ``load`` and ``__version__``. The stages live in
``kompakt.compress``, ``kompakt.export`` and ``kompakt.runtime``. ``save`` and ``load`` are
imported on first use, so ``kompakt.runtime`` runs without torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "save"]


def __getattr__(name: str):
    if name in ("save", "load"):
        from kompakt import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module 'kompakt' has no attribute {name!r}")
