"""Export a (compressed) model to an Apache TVM bundle, and validate it.

Path: ``torch.export`` (batch >= 2, dynamic batch and, for token ids, sequence) ->
``relax.frontend.torch.from_exported_program`` (parameters kept as inputs) -> ``tvm.compile``
for the target (:mod:`kompakt.export.targets`) -> ``export_library``.

Codebook layers are replaced, in a copy of the model, by calls to two torch custom ops
(:mod:`kompakt.export.codebook_ops`) that the Relax importer lowers to the TIR kernels of
:mod:`kompakt.export.tvm_kernels`: the kernels read the packed codes, codebooks and scales
inside the matmul (or the embedding lookup), so the float weight matrix is never
materialised. A Codebook Conv2d decodes its kernel with the row kernel on each call
(a conv kernel is small) and runs TVM's conv2d on it.

Every tensor of the model (parameters and buffers) is a parameter of the compiled ``main``
and is stored in the bundle's ``params.ktns``, so the library holds code only, and the
manifest can show that codes stay packed (uint8). A bundle directory holds the library
(``model.so``, or ``model.tar`` of object files for Android), ``params.ktns`` and
``manifest.json``; it is written only once validated, atomically.

Validation: on targets the host can run, the compiled model against torch on the traced
shape and two others; on ``aarch64-linux-gnu`` under ``qemu-aarch64`` with the kompakt arm64
runner when it is installed. Above ``tolerance`` the export is refused.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kompakt.errors import KompaktError
from kompakt.export.base import (
    EXPORTERS,
    Outputs,
    atomic_output,
    dynamic_shapes,
    prepare,
    validate,
    validation_inputs,
)
from kompakt.export.codebook_ops import frozen, fused_copy
from kompakt.export.targets import Target, resolve
from kompakt.export.tvm_tuning import tuned
from kompakt.runtime.tvm import BUNDLE_FORMAT, MANIFEST, PARAMS


def _prepared(model: nn.Module) -> tuple[nn.Module, int, int]:
    """A copy of ``model`` with Codebook layers fused, batch norms folded, Linear weights
    stored input-major, and every persistent buffer made a parameter (non-persistent ones,
    e.g. rotary frequencies, become library constants); with the numbers of Codebook layers
    and of folded batch norms."""
    model, coded = fused_copy(model)
    model, folded = _batch_norms_folded(model)
    _linears_input_major(model)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                del module._buffers[name]
                module.register_parameter(name, frozen(buffer))
    return model, coded, folded


def _batch_norms_folded(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` with each eval-mode batch norm that alone reads a Conv or Linear output
    folded into that layer's weight and bias, as onnxruntime does when it loads a model. The
    parameters are inputs of the compiled model, so TVM cannot fold them itself: unfolded,
    every output element of such a conv pays a square root and a division. A model that
    torch.fx cannot trace symbolically (a transformers model) keeps its batch norms."""
    from torch.fx.experimental.optimization import fuse

    def count(m: nn.Module) -> int:
        return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())

    norms = count(model)
    if not norms:
        return model, 0
    try:
        folded = fuse(model, inplace=True)
    except Exception:  # not symbolically traceable: compiled as it is
        return model, 0
    return folded, norms - count(folded)


class _InputMajorLinear(nn.Module):
    """``nn.Linear`` with its weight stored transposed, ``[in, out]``: the Relax importer
    turns ``linear`` into a transpose of the weight and a matmul, and with the weight an
    input of the compiled model that transpose would run on every call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a Linear's weight directly
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight_t)
        return out if self.bias is None else out + self.bias


def _linears_input_major(model: nn.Module) -> None:
    """Each ``nn.Linear`` of ``model`` (a fused copy) with a weight of its own becomes an
    :class:`_InputMajorLinear`; a weight tied to another module (an LM head and its token
    table) stays as it is, stored once, and so does a model that is one bare Linear."""
    owners = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.Linear and owners[module.weight.data_ptr()] == 1:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _InputMajorLinear(module))


# ---- Relax lowering of the custom ops -------------------------------------------------


@functools.cache
def _kernel(kind: str, shape):
    from kompakt.export import tvm_kernels

    kernel = (tvm_kernels.codebook_linear if kind == "linear" else tvm_kernels.codebook_rows)(shape)
    # scheduled by hand: MetaSchedule leaves it as it is (it cannot parse its vector code)
    return kernel.with_attr("tirx.is_scheduled", True)


def _coded_shape(node, vector: dict[str, Any]):
    """The kernel's static shape; ``vector``: the target's fields of it (permute, lanes)."""
    from kompakt.export.tvm_kernels import CodedShape

    # both ops: (input, codes, codebook, group, scales, ...)
    codes, codebook, _, scales = (a.meta["val"] for a in node.args[1:5])
    bits, cols, block, has_scales, has_offsets = node.args[-5:]
    return CodedShape(
        rows=int(codes.shape[0]),
        cols=cols,
        bits=bits,
        row_bytes=int(codes.shape[1]),
        codebooks=int(codebook.shape[0]),
        entries=int(codebook.shape[1]),
        scale_rows=int(scales.shape[0]),
        blocks=int(scales.shape[1]),
        block=block,
        has_scales=has_scales,
        has_offsets=has_offsets,
        **vector,
    )


def _lower(kind: str, tensors: int, vector: dict[str, Any]):
    def convert(node, importer):
        from tvm import relax

        shape = _coded_shape(node, vector)
        args = [importer.env[a] for a in node.args[:tensors]]
        n = args[0].ty.shape[0]
        out = (n, shape.rows) if kind == "linear" else (n, shape.cols)
        func = importer.block_builder.add_func(_kernel(kind, shape), f"codebook_{kind}")
        return importer.block_builder.emit(
            relax.call_tir(func, args, relax.TensorType(out, "float32"))
        )

    return convert


def _select(node, importer):
    """``x.select(dim, index)`` (``x[:, -1]``) as a ``take`` that wraps negative indices. TVM
    0.27's own converter takes in its default mode, which reads out of bounds for a negative
    index: a GRU classifier's last step came out as values of 1e37."""
    from tvm import relax

    x, dim, index = importer.env[node.args[0]], node.args[1], node.args[2]
    index = relax.const(index, "int64")
    return importer.block_builder.emit(relax.op.take(x, index, dim, mode="wrap"))


def _convert_map(target: Target) -> dict[str, Any]:
    """The codebook kernels, and the converters that replace TVM's own where they are wrong.
    The kernels decode with AVX2's permute where the target's ``mattr`` lists ``+avx2``, and
    multiply 16-lane vectors where it lists ``+avx512f`` (8 otherwise)."""
    mattr = target.tvm.get("mattr", [])
    vector = {"permute": "+avx2" in mattr, "lanes": 16 if "+avx512f" in mattr else 8}
    return {
        "codebook_linear.default": _lower("linear", 7, vector),
        "codebook_rows.default": _lower("rows", 6, vector),
        "select.int": _select,
    }


# ---- export ----------------------------------------------------------------------------


def _to_relax(prepared: nn.Module, inputs, dynamic: bool, target: Target, label: str):
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with torch.no_grad():
            program = torch.export.export(
                prepared, inputs, dynamic_shapes=dynamic_shapes(inputs, dynamic)
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KompaktError(f"TVM export of {label}: torch.export failed: {first}") from e
    try:
        mod = from_exported_program(
            program, keep_params_as_input=True, custom_convert_map=_convert_map(target)
        )
    except Exception as e:  # an op the Relax importer has no converter for, mostly
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KompaktError(f"TVM export of {label}: TVM cannot import the graph: {first}") from e
    mod, params = relax.frontend.detach_params(mod)
    # tied parameters (an embedding and its LM head) are lifted once per name: pass one
    main, kept, first, binding = mod["main"], {}, {}, {}
    named = list(program.named_parameters())
    for var, (name, tensor), value in zip(
        main.params[len(inputs) :], named, params["main"], strict=True
    ):
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in first:
            binding[var] = first[key]
        else:
            first[key], kept[name] = var, value.numpy()
    if binding:
        mod["main"] = main.bind_params(binding)
    return mod, kept


def _compile(mod, target: Target, tune: int, tune_dir: Path | None, label: str):
    import tvm

    spec = dict(target.tvm)
    if tune:  # MetaSchedule sizes its search by the core count, which the target must state
        spec.setdefault("num-cores", os.cpu_count() or 1)
    tvm_target = tvm.target.Target(spec)
    try:
        if tune:
            mod = tuned(mod, tvm_target, tune, tune_dir)
        return tvm.compile(mod, target=tvm_target)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KompaktError(
            f"TVM export of {label}: compiling for {target.name} failed: {first}"
        ) from e


def _runner(bundle: Path, target: Target, names: list[str]):
    """``(run, None)``: runs the bundle, in this process on the host or under qemu for
    aarch64; or ``(None, why not)``."""
    if target.runs_on_host:
        from kompakt.runtime.tvm import TvmSession

        session = TvmSession(bundle)
        return lambda arrays: list(
            session.run(dict(zip(names, arrays, strict=True))).values()
        ), None
    if target.runs_under_qemu:
        from kompakt.runtime import runner

        missing = runner.missing()
        if missing is None:
            return lambda arrays: list(
                runner.run_bundle(bundle, dict(zip(names, arrays, strict=True)))[0].values()
            ), None
        return None, missing
    return None, f"the host cannot run {target.name} bundles"


@EXPORTERS.register("tvm")
def export_tvm(
    model_or_artifact: nn.Module | str | os.PathLike[str],
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    target: str | dict[str, Any] = "host",
    dynamic: bool = True,
    tolerance: float = 1e-4,
    tune: int = 0,
    tune_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Compile ``model_or_artifact`` for ``target`` into the bundle ``out_dir``; returns the
    report (also the bundle's ``manifest.json``). ``tune`` > 0: MetaSchedule tuning with that
    many trials per task (fused operator), its database in ``tune_dir`` (reused across runs);
    tuning needs static shapes, so it implies ``dynamic=False``."""
    import kompakt
    from kompakt.runtime.tensorfile import write_tensors

    spec = resolve(target)
    if tune and not spec.runs_on_host:
        raise KompaktError(
            f"tuning measures candidates on this machine, which cannot run {spec.name} code; "
            "tune with target='host' or export untuned (tune=0)"
        )
    dynamic = dynamic and not tune
    job = prepare(
        model_or_artifact,
        example_inputs,
        out_dir,
        dynamic=dynamic,
        overwrite=overwrite,
        trust_code=trust_code,
    )
    model, label, inputs, names = job.model, job.label, job.inputs, job.names
    language_model = job.language_model
    out_dir = Path(out_dir)
    if tune:
        tune_dir = Path(tune_dir) if tune_dir else out_dir.parent / f"{out_dir.name}-tuning"
        tune_dir.mkdir(parents=True, exist_ok=True)
    prepared, coded, folded = _prepared(model)
    start = time.perf_counter()
    mod, params = _to_relax(Outputs(prepared, language_model).eval(), inputs, dynamic, spec, label)
    executable = _compile(mod, spec, tune, tune_dir, label)
    compile_seconds = time.perf_counter() - start
    with atomic_output(out_dir) as bundle:
        bundle.mkdir()
        executable.export_library(str(bundle / spec.library), fcompile=spec.fcompile())
        write_tensors(bundle / PARAMS, params)
        bytes_by_dtype: dict[str, int] = {}
        for array in params.values():
            bytes_by_dtype[str(array.dtype)] = (
                bytes_by_dtype.get(str(array.dtype), 0) + array.nbytes
            )
        dims = dynamic_shapes(inputs, dynamic)
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": 1,
            "kompakt_version": kompakt.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": job.source or label,
            "target": {"name": spec.name, "tvm": spec.tvm},
            "library": spec.library,
            "link": spec.link_note,
            "inputs": [
                {
                    "name": n,
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": [
                        None if dims and i in dims[0][k] else d for i, d in enumerate(t.shape)
                    ],
                }
                for k, (n, t) in enumerate(zip(names, inputs, strict=True))
            ],
            "outputs": [{"name": "logits" if language_model else "output", "dtype": "float32"}],
            "params": {"count": len(params), "bytes_by_dtype": bytes_by_dtype},
            "codebook_layers": coded,
            "batch_norms_folded": folded,
            "tuning_trials": tune,
            "compile_seconds": round(compile_seconds, 2),
        }
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        run, why_not = _runner(bundle, spec, names)
        if run is None:
            manifest["validation"] = {"skipped": why_not}
        else:
            who = f"TVM export of {label} for {spec.name}: the compiled model"
            cases = validation_inputs(inputs, dynamic)
            # against the model as given: folding and tracing are checked too
            reference = Outputs(model, language_model).eval()
            manifest["validation"] = validate(run, reference, cases, tolerance, who)
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"path": str(out_dir), **manifest}
