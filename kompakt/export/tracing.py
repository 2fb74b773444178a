"""Tracing shared by the exporters: the wrapper that returns plain tensors, example inputs
with a batch of at least 2, dynamic axes, the extra validation shapes, and the error measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kompakt.errors import KompaktError


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
        return getattr(out, "logits", out)


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
