"""Export a (compressed) model to ONNX with the torch dynamo exporter, and validate it.

- The graph is traced with a batch of at least 2 (a batch-1 example is repeated), with a
  dynamic batch axis and, for token-id inputs ``[batch, seq]``, a dynamic sequence axis.
- Compression survives: pruned models export at their size; Codebook layers export their
  bit-packed uint8 codes, fp16 codebooks and scales, decoded inside the graph with standard
  ops (Mul, ReduceSum, Div, Mod, Gather). The exporter's optimizer is off (it would fold small
  decodes into dense initializers), and the model's metadata tells the runtime to disable
  onnxruntime's ConstantFolding, which would fold every decode at session creation.
  Export fails if any Codebook layer came out as a dense float initializer.
- Validation: onnxruntime outputs against torch on the traced shape and on two others;
  the error is the max absolute difference over the largest reference magnitude (at least 1).
  Above ``tolerance`` the export is refused and nothing is written.
- ``mobile=True`` also writes the ORT-format model (``.ort``, saved by onnxruntime with the
  same optimizers disabled) and ``required_operators.config`` for a reduced build.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kompakt.errors import KompaktError
from kompakt.export.tracing import (
    Outputs,
    as_tuple,
    dynamic_shapes,
    input_names,
    is_language_model,
    relative_error,
    validation_inputs,
)
from kompakt.runtime.ort import NO_FOLDING_KEY, create_session


def initializer_bytes(proto) -> dict[str, int]:
    """Bytes of the model's initializers by ONNX data type name."""
    import onnx
    from onnx import numpy_helper

    sizes: dict[str, int] = {}
    for init in proto.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type).lower()
        sizes[name] = sizes.get(name, 0) + numpy_helper.to_array(init).nbytes
    return sizes


def _check_codes_survived(proto, model: nn.Module) -> int:
    """The number of Codebook layers; fails if any came out as a dense float initializer."""
    import onnx

    from kompakt.compress.quantize.layers import CodedLayer

    coded = list({id(m.codes): m for m in model.modules() if isinstance(m, CodedLayer)}.values())
    if not coded:
        return 0
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    uint8_shapes = [
        tuple(i.dims) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8
    ]
    float_sizes = [
        int(torch.tensor(list(i.dims)).prod())
        for i in proto.graph.initializer
        if i.data_type in floats
    ]
    dense_sizes = [p.numel() for p in model.parameters()] + [
        b.numel() for b in model.buffers() if b.is_floating_point()
    ]
    for layer in coded:
        weights = layer.layout.rows * layer.layout.cols
        if tuple(layer.codes.shape) not in uint8_shapes or float_sizes.count(
            weights
        ) > dense_sizes.count(weights):
            raise KompaktError(
                f"ONNX export: a {type(layer).__name__} ({layer.layout.rows}x{layer.layout.cols}, "
                f"{layer.layout.bits}-bit) came out as a dense float initializer instead of packed "
                "codes; the graph must decode the codes at run time"
            )
    return len(coded)


def _validate(
    wrapper: nn.Module, path: Path, cases, names: list[str], no_folding: bool, tolerance: float
):
    session = create_session(path, no_folding)
    results = []
    with torch.no_grad():
        for case in cases:
            ref = wrapper(*case)
            ref = ref if isinstance(ref, tuple | list) else (ref,)
            got = session.run(None, {n: t.numpy() for n, t in zip(names, case, strict=True)})
            errors = relative_error(ref, [torch.from_numpy(g) for g in got])
            results.append({"shapes": [list(t.shape) for t in case], **errors})
    worst = max(r["max_rel_error"] for r in results)
    return {
        "cases": results,
        "tolerance": tolerance,
        "max_rel_error": worst,
        "valid": worst <= tolerance,
    }


def _write_mobile(path: Path, no_folding: bool) -> tuple[Path, Path]:
    """``<name>.ort`` and ``required_operators.config`` beside ``path``."""
    import onnx

    ort_path = path.with_suffix(".ort")
    create_session(path, no_folding, save_ort=ort_path)
    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[tuple[str, int], set[str]] = {}
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    for node in proto.graph.node:
        domain = node.domain or "ai.onnx"
        ops.setdefault((domain, versions.get(domain, 1)), set()).add(node.op_type)
    lines = [f"{d};{v};{','.join(sorted(o))}" for (d, v), o in sorted(ops.items())]
    config = path.parent / "required_operators.config"
    config.write_text(
        "# Generated by kompakt for an onnxruntime reduced build\n" + "\n".join(lines) + "\n"
    )
    return ort_path, config


def export_onnx(
    model_or_artifact: nn.Module | str | os.PathLike[str],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    tolerance: float = 1e-4,
    mobile: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export, check and validate; writes ``path`` only if valid. Returns the report."""
    import onnx

    import kompakt

    model = model_or_artifact
    if not isinstance(model, nn.Module):
        model = kompakt.load(model_or_artifact)
    model.eval()
    path = Path(path)
    if path.exists() and not overwrite:
        raise KompaktError(
            f"{path}: already exists; pass overwrite=True (--overwrite) or choose another path"
        )
    inputs = as_tuple(example_inputs, dynamic)
    names = input_names(inputs)
    language_model = is_language_model(model)
    wrapper = Outputs(model, language_model).eval()
    output_names = ["logits" if language_model else "output"]
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            torch.onnx.export(
                wrapper,
                inputs,
                str(tmp_path),
                dynamo=True,
                optimize=False,
                input_names=names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes(inputs, dynamic),
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; name the model and the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KompaktError(f"ONNX export of {type(model).__name__} failed: {first}") from e
        proto = onnx.load(str(tmp_path))
        coded = _check_codes_survived(proto, model)
        validation = _validate(
            wrapper, tmp_path, validation_inputs(inputs, dynamic), names, coded > 0, tolerance
        )
        if not validation["valid"]:
            worst = max(validation["cases"], key=lambda c: c["max_rel_error"])
            raise KompaktError(
                f"ONNX export of {type(model).__name__}: onnxruntime differs from torch by "
                f"{worst['max_rel_error']:.3g} (relative) on shapes {worst['shapes']}, above the "
                f"tolerance {tolerance:g}; nothing written"
            )
        for (
            node
        ) in proto.graph.node:  # the exporter's per-node stack traces: often most of the file
            del node.metadata_props[:]
            node.doc_string = ""
        meta = {
            NO_FOLDING_KEY: "1" if coded else "0",
            "kompakt.version": kompakt.__version__,
            "kompakt.max_rel_error": f"{validation['max_rel_error']:.3g}",
        }
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, path)
    report = {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "inputs": [
            {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "traced_shape": list(t.shape)}
            for n, t in zip(names, inputs, strict=True)
        ],
        "dynamic": dynamic,
        "initializer_bytes": initializer_bytes(proto),
        "codebook_layers": coded,
        "constant_folding_disabled": bool(coded),
        "validation": validation,
    }
    if mobile:
        ort_path, config = _write_mobile(path, bool(coded))
        report["ort_path"], report["required_operators"] = str(ort_path), str(config)
    return report
