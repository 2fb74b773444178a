"""The on-disk artifact: a directory holding ``model.safetensors`` and ``kompakt.json``.

``model.safetensors`` holds plain tensors only (compressed layers keep their compressed
tensors). ``kompakt.json`` holds the format version, the kompakt version, the source model
(how to build its architecture and the sha256 of its weights), the ordered list of steps
applied with their configs and metrics, the structural plan that turns the base
architecture into this model, and one entry per layer with its encoding.

Rebuilding = base architecture (a registered model factory, a transformers config and
class, or the user's own factory named at save time) + the plan + the tensors. Nothing is
ever unpickled, and code a manifest names (a user factory) is imported only when the caller
says so (``trust_code=True``) or hands the factory itself to :func:`load`. Writes are
atomic: everything is written to a temporary directory beside the target, fsynced, then
renamed into place. No other module writes model files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kompakt.errors import KompaktError
from kompakt.registry import Registry

FORMAT = "kompakt-artifact"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "kompakt.json"
RECORD_ATTR = "kompakt_record"


@dataclasses.dataclass
class Record:
    """What a model carries so that it can be saved and rebuilt.

    ``source`` says how to build the base architecture: ``{"kind": "registry", "name", "kwargs"}``,
    ``{"kind": "transformers", "class", "config"}`` or ``{"kind": "factory", "factory":
    "pkg.module:function", "kwargs"}``, plus a human ``label``. A module kompakt did not build
    gets ``{"kind": "module", "class"}``: it can be compressed and exported as it is, and is
    saved once :func:`save` is told its factory.
    ``plan`` lists the structural changes applied to the base, in order; each entry has a
    ``kind`` handled by a function registered with :func:`plan_step`. ``inputs``: what the
    model takes, as :func:`input_specs` describes it, when known (a registered architecture
    declares it; the first recorded step that saw data notes it), so that exporting an
    artifact needs no guess.
    """

    source: dict[str, Any]
    source_sha256: str | None = None
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    plan: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# --- plan steps: structural changes recorded by compressors, replayed on load -------------

PlanHandler = Callable[[nn.Module, dict[str, Any]], None]
PLAN_STEPS: Registry[PlanHandler] = Registry("plan step kind")
PLAN_MODULES = {
    "prune": "kompakt.compress.prune.subnet",
    "erase": "kompakt.compress.prune.erase",
    "boost_head": "kompakt.compress.boost.head",
    "quantize": "kompakt.compress.quantize.layers",
}
"""The module that registers each plan kind's handler, imported on first use by :func:`load`."""


def plan_step(kind: str) -> Callable[[PlanHandler], PlanHandler]:
    """Register the function that replays plan entries of ``kind`` on a freshly built model."""
    return PLAN_STEPS.register(kind)


# --- records ------------------------------------------------------------------------------


def attach_record(model: nn.Module, record: Record) -> nn.Module:
    """Attach ``record`` to ``model`` (a plain attribute, so deepcopy keeps it)."""
    object.__setattr__(model, RECORD_ATTR, record)
    return model


def record_of(model: nn.Module) -> Record:
    """The model's record, attached on first use: transformers models are described by their
    config, any other module by its class (enough to compress it; :func:`save` then asks for
    its factory)."""
    record = getattr(model, RECORD_ATTR, None)
    if record is not None:
        return record
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()  # noqa: N806
    if isinstance(model, PreTrainedModel):
        source = transformers_source(model)
    else:
        cls = type(model)
        source = {
            "kind": "module",
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "label": cls.__name__,
        }
    record = Record(source=source)
    attach_record(model, record)
    return record


FACTORY_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def factory_source(
    factory: str | Callable[..., nn.Module], kwargs: dict[str, Any], label: str
) -> dict[str, Any]:
    """A source entry for the user's own factory: ``"pkg.module:function"`` (or a function or
    class importable under that name) called with ``kwargs`` (JSON values) to build the base
    architecture. The factory is resolved now, so that a wrong name fails at save time."""
    if callable(factory):
        name = f"{factory.__module__}:{factory.__qualname__}"
        if factory.__module__ == "__main__" or "<" in factory.__qualname__:
            raise KompaktError(
                f"factory {name}: cannot be imported by name when the artifact is loaded (it is "
                "defined in a script, a function body or a lambda); move it to a module and pass "
                "it, or its 'pkg.module:function' path"
            )
    else:
        name = str(factory)
    if not FACTORY_PATH.match(name):
        raise KompaktError(f"factory {name!r}: expected 'pkg.module:function'")
    try:
        json_kwargs = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as e:
        raise KompaktError(
            f"factory {name}: kwargs must be JSON values (numbers, strings, lists, dicts): {e}"
        ) from e
    if json_kwargs != kwargs:
        raise KompaktError(
            f"factory {name}: kwargs do not survive JSON unchanged (tuples or non-string keys?); pass lists and string keys"
        )
    resolve_factory(name, "kompakt.save")
    return {"kind": "factory", "factory": name, "kwargs": json_kwargs, "label": label}


def resolve_factory(name: str, where: str) -> Callable[..., nn.Module]:
    """Import ``"pkg.module:function"`` (this runs the module's code: callers decide whether
    to trust it)."""
    module_name, _, attribute = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise KompaktError(f"{where}: factory {name!r} cannot be imported ({e})") from e
    if not callable(obj):
        raise KompaktError(f"{where}: factory {name!r} is a {type(obj).__name__}, not callable")
    return obj


def transformers_source(model: nn.Module, label: str | None = None) -> dict[str, Any]:
    """A source entry for a transformers model: its class name and full config."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return {
        "kind": "transformers",
        "class": type(model).__name__,
        "config": config,
        "label": label or type(model).__name__,
    }


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def input_specs(example: Any) -> list[dict[str, Any]]:
    """What a model takes, from example inputs (a tensor, a tuple or list of tensors, or a
    dict of keyword tensors): each tensor's name, dtype and shape, the first (batch) axis
    left open as ``None``."""
    if isinstance(example, torch.Tensor):
        named = [("input", example)]
    elif isinstance(example, dict):
        named = list(example.items())
    elif isinstance(example, tuple | list):
        named = [(f"input_{i}", t) for i, t in enumerate(example)]
    else:
        named = []
    return [
        {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": [None, *t.shape[1:]]}
        for n, t in named
        if isinstance(t, torch.Tensor) and t.dim() >= 1
    ]


@contextlib.contextmanager
def step(
    model: nn.Module, method: str, config: dict[str, Any], inputs: Any = None
) -> Iterator[dict[str, Any]]:
    """Record one step applied to ``model``; the body fills the yielded metrics dict.

    The source weights' sha256 is taken on entry to the first recorded step, and ``inputs``
    (example inputs the step runs the model on) describe the model's inputs if nothing did
    before. The step is appended only if the body finishes.
    """
    record = record_of(model)
    if record.source_sha256 is None:
        record.source_sha256 = weights_sha256(model)
    if inputs is not None and not record.inputs:
        record.inputs = input_specs(inputs)
    metrics: dict[str, Any] = {}
    yield metrics
    record.steps.append({"method": method, "config": config, "metrics": metrics})


# --- save ---------------------------------------------------------------------------------


def _layer_entries(
    model: nn.Module, stored: dict[str, torch.Tensor], aliases: dict[str, str]
) -> list[dict[str, Any]]:
    """One entry per module that owns tensors: its type, encoding and logical sizes.

    A compressed module describes itself with ``kompakt_encoding()`` returning at least
    ``method``, ``params`` (logical parameter count) and ``fp32_bytes`` (its size as dense fp32).
    A module whose tensors are all aliases of another's (tied weights) has method ``tied``.
    """
    layers = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        params = [prefix + n for n, _ in module.named_parameters(recurse=False)]
        buffers = [
            prefix + n
            for n, _ in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]
        keys = [k for k in params + buffers if k in stored or k in aliases]
        if not keys:
            continue
        if hasattr(module, "kompakt_encoding"):
            encoding = dict(module.kompakt_encoding())
        elif all(k in aliases for k in keys):
            encoding = {"method": "tied", "params": 0, "fp32_bytes": 0, "tied_to": aliases[keys[0]]}
        else:
            own = [stored[k] for k in keys if k in stored]
            encoding = {
                "method": "dense",
                "params": sum(stored[k].numel() for k in params if k in stored),
                "fp32_bytes": sum(
                    t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in own
                ),
            }
        layers.append({"name": name, "type": type(module).__name__, "tensors": keys, **encoding})
    return layers


def _split_aliases(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory once; the other names become aliases of the first."""
    first_by_ptr: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in first_by_ptr:
            aliases[name] = first_by_ptr[key]
            continue
        first_by_ptr[key] = name
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    return tensors, aliases


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    factory: str | Callable[..., nn.Module] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as an artifact directory at ``path`` (atomically) and return the path.

    An existing directory is replaced only with ``overwrite=True``; until the new artifact is
    complete the old one stays untouched. A model kompakt did not build (not registered, not
    a transformers model) needs ``factory``: ``"pkg.module:function"`` or that function or
    class itself, which ``factory(**kwargs)`` builds the model's architecture *before* any
    compression (the steps recorded since are replayed on it). The model's record keeps it.
    """
    from kompakt import __version__

    target = Path(path)
    if target.exists() and not overwrite:
        raise KompaktError(f"{target}: already exists; pass overwrite=True or choose another path")
    if target.exists() and not (target / MANIFEST_FILE).is_file():
        raise KompaktError(
            f"{target}: exists and is not a kompakt artifact; refusing to replace it"
        )
    record = record_of(model)
    if factory is not None:
        label = record.source.get("label", type(model).__name__)
        record.source = factory_source(factory, kwargs or {}, label)
    elif kwargs is not None:
        raise KompaktError("kompakt.save: kwargs= goes with factory=, the function it is passed to")
    if record.source["kind"] == "module":
        raise KompaktError(
            f"cannot save a {record.source['class']}: kompakt does not know how to rebuild its "
            "architecture; pass factory='pkg.module:function' (what builds it, before any "
            "compression) and kwargs={...} to kompakt.save, or build a registered architecture "
            "with kompakt.models.build(name)"
        )
    state = model.state_dict()
    tensors, aliases = _split_aliases(state)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kompakt_version": __version__,
        "source": record.source,
        "source_sha256": record.source_sha256 or weights_sha256(model),
        "steps": record.steps,
        "plan": record.plan,
        "inputs": record.inputs,
        "aliases": aliases,
        "layers": _layer_entries(model, tensors, aliases),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        for f in (WEIGHTS_FILE, MANIFEST_FILE):
            _fsync(tmp / f)
        _fsync(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


# --- load ---------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``kompakt.json`` of the artifact at ``path``."""
    root = Path(path)
    if not root.exists():
        raise KompaktError(
            f"{root}: no such artifact directory; pass a directory written by kompakt.save"
        )
    if not root.is_dir():
        raise KompaktError(
            f"{root}: is a file, not an artifact directory; pass the directory that holds {MANIFEST_FILE}"
        )
    file = root / MANIFEST_FILE
    if not file.is_file():
        raise KompaktError(
            f"{file}: missing; {root} is not a kompakt artifact (re-create it with kompakt.save)"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KompaktError(
            f"{file}: corrupt ({e}); re-create the artifact with kompakt.save"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KompaktError(f'{file}: not a kompakt artifact manifest (no "format": "{FORMAT}")')
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        from kompakt import __version__

        raise KompaktError(
            f"{file}: artifact format version {version!r} is not supported by kompakt "
            f"{__version__} (it reads version {FORMAT_VERSION}); use the kompakt that wrote it "
            "or re-create the artifact"
        )
    for field in ("source", "steps", "plan", "aliases", "layers"):
        if field not in manifest:
            raise KompaktError(f"{file}: field {field!r} is missing; re-create the artifact")
    return manifest


def read_weights_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (dtype, shape, byte range), checked against its size.

    A truncated or corrupt file raises :class:`KompaktError` naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise KompaktError(f"{file}: missing; re-create the artifact with kompakt.save")
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KompaktError(f"{file}: truncated ({size} bytes); re-create the artifact")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise KompaktError(
                f"{file}: truncated or corrupt (header of {n} bytes in a {size}-byte file); re-create the artifact"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KompaktError(f"{file}: corrupt header ({e}); re-create the artifact") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise KompaktError(
            f"{file}: truncated or corrupt ({size} bytes, the header describes {8 + n + end}); "
            "re-create the artifact"
        )
    return header


def build_base(
    source: dict[str, Any],
    where: str = "source",
    *,
    trust_code: bool = False,
    factory: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Build the base architecture named by a manifest's ``source`` entry (random weights).

    A ``factory`` source names code: it is imported only with ``trust_code=True``, or not at
    all when the caller passes ``factory`` itself.
    """
    kind = source.get("kind")
    if factory is not None and kind != "factory":
        raise KompaktError(
            f"{where}: factory= was given, but the model is built from its {kind} source"
        )
    if kind == "factory":
        name = source.get("factory")
        if factory is None:
            if not trust_code:
                raise KompaktError(
                    f"{where}: the model is built by {name!r}, code that the artifact names; "
                    "kompakt imports it only when told to: kompakt.load(path, trust_code=True) "
                    "(CLI: --trust-code) if you trust where the artifact came from, or "
                    "kompakt.load(path, factory=<that function>)"
                )
            factory = resolve_factory(str(name), where)
        model = factory(**source.get("kwargs", {}))
        if not isinstance(model, nn.Module):
            raise KompaktError(
                f"{where}: factory {name!r} returned a {type(model).__name__}, not an nn.Module"
            )
        return model
    if kind == "registry":
        from kompakt.models import build

        return build(source["name"], **source.get("kwargs", {}))
    if kind == "transformers":
        import transformers

        cls = getattr(transformers, str(source.get("class")), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise KompaktError(
                f"{where}: {source.get('class')!r} is not a transformers model class"
            )
        config = cls.config_class.from_dict(source["config"])
        return cls(config)
    raise KompaktError(
        f"{where}: unknown source kind {kind!r} (known: registry, transformers, factory)"
    )


def _tie(model: nn.Module, alias: str, target: str) -> None:
    owner_name, _, leaf = alias.rpartition(".")
    owner = model.get_submodule(owner_name)
    tensor = model.get_parameter(target) if leaf in owner._parameters else model.get_buffer(target)
    setattr(owner, leaf, tensor)


def load(
    path: str | os.PathLike[str],
    *,
    trust_code: bool = False,
    factory: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Rebuild the model saved at ``path`` (in eval mode), with its record attached.

    An artifact saved with a factory names code to import: pass ``trust_code=True`` to import
    it, or ``factory`` (the function itself) to import nothing.
    """
    root = Path(path)
    manifest = read_manifest(root)
    where = str(root / MANIFEST_FILE)
    read_weights_header(root / WEIGHTS_FILE)
    model = build_base(manifest["source"], where, trust_code=trust_code, factory=factory)
    for i, entry in enumerate(manifest["plan"]):
        kind = entry.get("kind")
        if kind in PLAN_MODULES and kind not in PLAN_STEPS:
            importlib.import_module(PLAN_MODULES[kind])
        if kind not in PLAN_STEPS:
            raise KompaktError(
                f"{where}: plan[{i}] has kind {kind!r}, which this kompakt cannot "
                f"replay (known: {', '.join(PLAN_STEPS.names()) or 'none'})"
            )
        PLAN_STEPS.get(kind)(model, entry)
    try:
        tensors = load_file(str(root / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types
        raise KompaktError(
            f"{root / WEIGHTS_FILE}: unreadable ({e}); re-create the artifact"
        ) from e
    aliases = manifest["aliases"]
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise KompaktError(
            f"{root / WEIGHTS_FILE}: tensors do not match the rebuilt architecture "
            f"({' '.join(first[:3])}); the artifact is inconsistent, re-create it"
        ) from e
    for alias, target in aliases.items():
        _tie(model, alias, target)
    record = Record(
        source=manifest["source"],
        source_sha256=manifest["source_sha256"],
        steps=manifest["steps"],
        plan=manifest["plan"],
        inputs=manifest.get("inputs", []),
    )
    return attach_record(model.eval(), record)
