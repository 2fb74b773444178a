"""kompakt: compress trained PyTorch models and ship them to phones and edge boards.

The public surface here is small: ``save``, ``load`` and ``__version__``. The stages live in
``kompakt.compress``, ``kompakt.export`` and ``kompakt.runtime``.
"""

__version__ = "0.1.0"

from kompakt.artifact import load, save  # noqa: E402

__all__ = ["__version__", "load", "save"]
