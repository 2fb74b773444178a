"""What every exporter shares: the registry of exporters by name, the preamble (the model
from memory or an artifact, the output refused if it exists, the example inputs as traced),
the wrapper that returns plain tensors, dynamic axes, validation on shapes other than the
traced ones, and the atomic write of what passed it.

An exporter is a function ``export(model_or_artifact, example_inputs, out, **options) ->
report`` registered with ``@EXPORTERS.register(name)`` in the module that defines it; adding
a target is one module that calls :func:`prepare`, :func:`validate` and
:func:`atomic_output`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kompakt.errors import KompaktError
from kompakt.registry import Registry

EXPORTERS: Registry[Callable[..., dict[str, Any]]] = Registry("export target")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An exporter's starting point, from :func:`prepare`."""

    model: nn.Module  # in eval mode
    source: str | None  # the artifact it was loaded from, if any
    label: str  # its class name, for messages
    inputs: tuple[torch.Tensor, ...]  # as traced: a batch of at least 2 when dynamic
    names: list[str]  # the exported inputs' names
    language_model: bool  # traced for its logits, with an all-ones attention mask


def prepare(
    model_or_artifact: nn.Module | str | os.PathLike[str],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    out: str | os.PathLike[str],
    *,
    dynamic: bool,
    overwrite: bool,
    trust_code: bool = False,
) -> Prepared:
    """The model (an artifact is loaded as :func:`kompakt.load` does, ``trust_code``
    included), its example inputs, and ``out`` refused if it exists unless ``overwrite``."""
    import kompakt

    out = Path(out)
    if out.exists() and not overwrite:
        raise KompaktError(
            f"{out}: already exists; pass overwrite=True (--overwrite) or choose another path"
        )
    model, source = model_or_artifact, None
    if not isinstance(model, nn.Module):
        source = str(model_or_artifact)
        model = kompakt.load(model_or_artifact, trust_code=trust_code)
    model.eval()
    inputs = as_tuple(example_inputs, dynamic)
    return Prepared(
        model, source, type(model).__name__, inputs, input_names(inputs), is_language_model(model)
    )


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A path to write ``path``'s new content to (a file or a directory), in a temporary
    folder beside it; when the block finishes it replaces ``path`` in one rename. If the block
    fails, nothing is left: not the temporary folder, not a parent folder made for it."""
    path = Path(path)
    made = [p for p in path.parents if not p.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
            staged = Path(tmp) / path.name
            yield staged
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(staged, path)
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


class Outputs(nn.Module):
    """Calls the model with positional tensors and returns plain tensors (logits for LMs)."""

    def __init__(self, model: nn.Module, language_model: bool) -> None:
        super().__init__()
        self.model = model
        self.language_model = language_model

    def forward(self, *inputs: torch.Tensor):
        if self.language_model:  # an explicit all-ones mask: a simpler graph to lower
            mask = torch.ones_like(inputs[0])
            return self.model(*inputs, attention_mask=mask, use_cache=False).logits
        out = self.model(*inputs)
        if hasattr(out, "logits"):
            return out.logits
        if hasattr(out, "to_tuple"):  # a transformers output without logits: its first field
            return out.to_tuple()[0]  # (an encoder's last_hidden_state)
        return out


def is_language_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "lm_head")


def as_tuple(
    example_inputs: torch.Tensor | Sequence[torch.Tensor], dynamic: bool = True
) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple; for a dynamic batch, a batch of 1 is repeated to 2 (a
    batch-1 trace fixes the batch axis)."""
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise KompaktError("example_inputs must be a tensor or a sequence of tensors")
    if not dynamic:
        return inputs
    return tuple(t if t.shape[0] >= 2 else t.repeat(2, *[1] * (t.dim() - 1)) for t in inputs)


def is_tokens(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.dim() == 2


def input_names(inputs: tuple[torch.Tensor, ...]) -> list[str]:
    if len(inputs) == 1:
        return ["input_ids" if is_tokens(inputs[0]) else "input"]
    return [f"input_{i}" for i in range(len(inputs))]


def dynamic_shapes(inputs: tuple[torch.Tensor, ...], dynamic: bool):
    if not dynamic:
        return None
    # no upper bounds: TVM plans static memory for a bounded axis at its upper bound
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=2)
    # one entry: the wrapper's ``*inputs``
    return (tuple({0: batch, 1: seq} if is_tokens(t) else {0: batch} for t in inputs),)


def validation_inputs(
    inputs: tuple[torch.Tensor, ...], dynamic: bool
) -> list[tuple[torch.Tensor, ...]]:
    """Inputs of the traced shape and, when dynamic, of two other batch (and seq) sizes."""
    cases = [inputs]
    if not dynamic:
        return cases
    gen = torch.Generator().manual_seed(0)
    for batch, seq_delta in ((inputs[0].shape[0] + 1, -1), (1, 3)):
        case = []
        for t in inputs:
            if is_tokens(t):
                seq = max(2, t.shape[1] + seq_delta)
                reps = (-(-batch // t.shape[0]), -(-seq // t.shape[1]))
                case.append(t.repeat(*reps)[:batch, :seq])
            elif t.is_floating_point():
                case.append(torch.randn((batch, *t.shape[1:]), generator=gen, dtype=t.dtype))
            else:
                case.append(t.repeat(-(-batch // t.shape[0]), *[1] * (t.dim() - 1))[:batch])
        cases.append(tuple(case))
    return cases


def relative_error(reference: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> dict:
    """Max absolute difference, and that over the largest reference magnitude (at least 1)."""
    abs_err = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    scale = max(max(float(r.abs().max()) for r in reference), 1.0)
    return {"max_abs_error": abs_err, "max_rel_error": abs_err / scale}


def validate(run, wrapper: nn.Module, cases, tolerance: float, who: str) -> dict[str, Any]:
    """Run each case through ``run`` (numpy arrays in, a list of output arrays out) and
    torch; the errors of each case and the worst. Above ``tolerance`` it raises, naming
    ``who`` (e.g. "ONNX export of Net: onnxruntime"): the caller writes nothing."""
    results = []
    with torch.no_grad():
        for case in cases:
            ref = wrapper(*case)
            ref = ref if isinstance(ref, tuple | list) else (ref,)
            got = [torch.from_numpy(g) for g in run([t.numpy() for t in case])]
            results.append({"shapes": [list(t.shape) for t in case], **relative_error(ref, got)})
    worst = max(results, key=lambda r: r["max_rel_error"])
    if worst["max_rel_error"] > tolerance:
        raise KompaktError(
            f"{who} differs from torch by {worst['max_rel_error']:.3g} (relative) on shapes "
            f"{worst['shapes']}, above the tolerance {tolerance:g}; nothing written"
        )
    return {
        "cases": results,
        "tolerance": tolerance,
        "max_rel_error": worst["max_rel_error"],
        "valid": True,
    }
