"""``kompakt pipeline``: run a recipe (YAML) of stages on one model, in order.

A recipe names the output folder, the seed for the model's initial weights, the model (a
registered architecture) and the data, then lists stages, each ``{stage_name: {config fields}}``. Stages are registered with
:func:`stage` and receive the shared :class:`PipelineState` and their validated config.
With no recipe, the built-in ``recipes/demo.yaml`` runs (what ``make demo`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kompakt import artifact
from kompakt.compress.boost import BoostHeadConfig, boost_classifier_head, describe
from kompakt.compress.prune.classifier import PruneConfig, prune_classifier
from kompakt.compress.quantize import QuantizeConfig, quantize
from kompakt.config import check, from_mapping, to_dict
from kompakt.errors import KompaktError
from kompakt.eval import accuracy
from kompakt.train import TrainConfig, train_classifier

RECIPE_FIELDS = ("out", "seed", "model", "data", "stages")
DATASETS = ("fashion-mnist",)


@dataclasses.dataclass
class PipelineState:
    """What the stages share: the output folder, the current model, the data and a logger."""

    out: Path
    model: nn.Module
    dataset: str
    log: Callable[[str], None] = print
    _data: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of ``split``, loaded once."""
        if split not in self._data:
            from kompakt.data import fashion_mnist

            self._data[split] = fashion_mnist(split)
        return self._data[split]


Stage = Callable[[PipelineState, Any], None]
_STAGES: dict[str, tuple[type, Stage]] = {}


def stage(name: str, config_cls: type) -> Callable[[Stage], Stage]:
    """Register a pipeline stage ``name`` whose recipe fields build ``config_cls``."""

    def register(fn: Stage) -> Stage:
        if name in _STAGES:
            raise ValueError(f"pipeline stage {name!r} is registered twice")
        _STAGES[name] = (config_cls, fn)
        return fn

    return register


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Top-1 accuracy on a split (``test`` or ``train``)."""

    split: str = "test"

    def __post_init__(self) -> None:
        check(
            self.split in ("train", "test"), f"split must be 'train' or 'test', got {self.split!r}"
        )


@dataclasses.dataclass(frozen=True)
class SaveConfig:
    """Save the current model as an artifact in ``<out>/<name>`` and print its inspection."""

    name: str = "model"

    def __post_init__(self) -> None:
        check(
            bool(self.name) and "/" not in self.name,
            f"name must be a plain folder name, got {self.name!r}",
        )


@stage("train", TrainConfig)
def _train(state: PipelineState, config: TrainConfig) -> None:
    images, labels = state.data("train")
    n = len(images) if config.limit is None else min(config.limit, len(images))
    state.log(f"[train] {config.epochs} epoch(s) on {n:,} {state.dataset} examples")
    with artifact.step(state.model, "train", to_dict(config), inputs=images[:2]) as metrics:
        metrics.update(train_classifier(state.model, images, labels, config))
    state.log(f"[train] final epoch loss {metrics['train_loss']:.4f}")


@stage("evaluate", EvaluateConfig)
def _evaluate(state: PipelineState, config: EvaluateConfig) -> None:
    acc = accuracy(state.model, *state.data(config.split))
    steps = artifact.record_of(state.model).steps
    if steps:
        steps[-1]["metrics"][f"{config.split}_accuracy"] = acc
    state.log(f"[evaluate] {config.split} accuracy: {acc:.2%}")


@stage("save", SaveConfig)
def _save(state: PipelineState, config: SaveConfig) -> None:
    from kompakt.summary import format_inspection, inspect_artifact

    path = artifact.save(state.model, state.out / config.name, overwrite=True)
    state.log(f"[save] {path}")
    state.log(format_inspection(inspect_artifact(path)))


@stage("prune", PruneConfig)
def _prune(state: PipelineState, config: PruneConfig) -> None:
    what = "channel groups (DHSPG)" if config.mode == "prune" else "residual branches (H2SPG)"
    state.log(
        f"[prune] {config.target_group_sparsity:.0%} of {what}, {config.epochs} epoch(s), no fine-tuning after"
    )
    state.model, m = prune_classifier(
        state.model, *state.data("train"), config, test=state.data("test")
    )
    state.log(
        f"[prune] FLOPs {m['flops_before']:,} -> {m['flops_after']:,} "
        f"({1 - m['flops_after'] / m['flops_before']:.0%} removed), parameters {m['params_before']:,} -> "
        f"{m['params_after']:,}, test accuracy {m['test_accuracy_before']:.2%} -> {m['test_accuracy']:.2%}"
    )


@stage("boost", BoostHeadConfig)
def _boost(state: PipelineState, config: BoostHeadConfig) -> None:
    state.log(
        f"[boost] GBNN head for {config.head!r}: up to {config.steps} steps of "
        f"{config.units_per_step} units on frozen features"
    )
    metrics = boost_classifier_head(state.model, state.data("train"), state.data("test"), config)
    state.log(f"[boost] {describe(metrics, config.head)}")


@dataclasses.dataclass(frozen=True)
class QuantizeStageConfig(QuantizeConfig):
    """:class:`QuantizeConfig` plus ``calibration``: training images the layers are calibrated on."""

    calibration: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.calibration >= 1, f"calibration must be >= 1, got {self.calibration}")


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as saved (shared tensors once)."""
    tensors = {(t.data_ptr(), t.dtype): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@stage("quantize", QuantizeStageConfig)
def _quantize(state: PipelineState, config: QuantizeStageConfig) -> None:
    state.log(
        f"[quantize] {config.method} at {config.bits:g} bits, calibrated on {config.calibration} "
        "training images"
    )
    test = state.data("test")
    acc, size = accuracy(state.model, *test), stored_bytes(state.model)
    images = state.data("train")[0][: config.calibration]
    quantize(state.model, config, list(images.split(128)))
    m = artifact.record_of(state.model).steps[-1]["metrics"]
    state.log(
        f"[quantize] {m['coded_layers']} layers at {m['bits_per_weight']:.2f} bits per weight; "
        f"size {size:,} -> {stored_bytes(state.model):,} bytes; test accuracy {acc:.2%} -> "
        f"{accuracy(state.model, *test):.2%}"
    )


def check_plain_name(name: str) -> None:
    check(bool(name) and "/" not in name, f"name must be a plain file name, got {name!r}")


@dataclasses.dataclass(frozen=True)
class ExportOnnxConfig:
    """Export the current model to ``<out>/<name>.onnx``, run it in onnxruntime and print the
    ``kompakt bench`` table beside that of the artifact saved as ``<out>/<baseline>``."""

    name: str = "model"
    baseline: str | None = None
    batches: tuple[int, ...] = (1, 64)
    repeats: int = 20

    def __post_init__(self) -> None:
        check_plain_name(self.name)
        check(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        object.__setattr__(self, "batches", tuple(self.batches))


@stage("export_onnx", ExportOnnxConfig)
def _export_onnx(state: PipelineState, config: ExportOnnxConfig) -> None:
    from kompakt import export
    from kompakt.runtime.bench import bench, format_table

    example = state.data("test")[0][:2]
    models = [(config.name, state.model)]
    if config.baseline:
        models.insert(0, (config.baseline, artifact.load(state.out / config.baseline)))
    results = []
    for name, model in models:
        report = export.onnx(model, example, state.out / f"{name}.onnx", overwrite=True)
        sizes = ", ".join(f"{k} {v:,}" for k, v in sorted(report["initializer_bytes"].items()))
        state.log(
            f"[export_onnx] {report['path']}: {report['file_bytes']:,} bytes (initializers: {sizes}); "
            f"onnxruntime vs torch max relative error {report['validation']['max_rel_error']:.2g}"
        )
        results.append(bench(report["path"], list(config.batches), repeats=config.repeats))
    state.log(format_table(results))


@dataclasses.dataclass(frozen=True)
class ExportTvmConfig:
    """Compile the current model to TVM bundles ``<out>/<name>-<target>``. Host bundles are
    benchmarked (``kompakt bench``); aarch64-linux-gnu bundles run on ``images`` test images
    under qemu with the arm64 runner (at most 3 times: emulation is slow). Each prints its top-1 on those images and its latency."""

    name: str = "model"
    targets: tuple[str, ...] = ("host", "aarch64-linux-gnu")
    images: int = 256
    batches: tuple[int, ...] = (1, 64)
    repeats: int = 20

    def __post_init__(self) -> None:
        check_plain_name(self.name)
        check(self.images >= 1 and self.repeats >= 1, "images and repeats must be >= 1")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "batches", tuple(self.batches))


@stage("export_tvm", ExportTvmConfig)
def _export_tvm(state: PipelineState, config: ExportTvmConfig) -> None:
    from kompakt import export, runtime
    from kompakt.runtime import runner
    from kompakt.runtime.bench import bench, format_table

    images, labels = (t[: config.images] for t in state.data("test"))
    for target in config.targets:
        bundle = state.out / f"{config.name}-{target}"
        report = export.tvm(state.model, images[:2], bundle, target=target, overwrite=True)
        sizes = ", ".join(
            f"{k} {v:,}" for k, v in sorted(report["params"]["bytes_by_dtype"].items())
        )
        state.log(
            f"[export_tvm] {bundle} ({target}): compiled in {report['compile_seconds']:.1f} s; "
            f"parameters {sizes}; {report['codebook_layers']} fused codebook layers"
        )
        if report["target"]["name"] == "host":
            (logits,) = runtime.load(bundle).run([images.numpy()]).values()
            how = "host"
        elif report["target"]["name"] == "aarch64-linux-gnu":
            # emulated: a few runs are enough to show the timing, which is not the device's
            outputs, timing = runner.run_bundle(
                bundle, {"input": images.numpy()}, repeat=min(config.repeats, 3)
            )
            (logits,) = outputs.values()
            how = (
                f"qemu-aarch64 (emulated), batch {len(images)}: {timing['median_ms']:.1f} ms median"
            )
        else:
            continue
        top1 = float((torch.from_numpy(logits).argmax(1) == labels).float().mean())
        state.log(f"[export_tvm] {target} on {len(images)} test images: top-1 {top1:.2%}; {how}")
        if report["target"]["name"] == "host":
            result = bench(bundle, list(config.batches), repeats=config.repeats)
            state.log(format_table([result]))


def load_recipe(path: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(where, recipe mapping)`` from a YAML file, or the built-in demo recipe."""
    if path is None:
        where = "built-in recipe demo.yaml"
        text = resources.files("kompakt").joinpath("recipes/demo.yaml").read_text()
    else:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise KompaktError(f"{path}: cannot read recipe ({e.strerror})") from e
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KompaktError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(recipe, dict):
        raise KompaktError(f"{where}: a recipe is a mapping with fields {', '.join(RECIPE_FIELDS)}")
    unknown = sorted(set(recipe) - set(RECIPE_FIELDS))
    if unknown:
        raise KompaktError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(RECIPE_FIELDS)}"
        )
    return where, recipe


def _parse_stages(where: str, stages: Any) -> list[tuple[str, Stage, Any]]:
    if not isinstance(stages, list) or not stages:
        raise KompaktError(
            f"{where}: 'stages' must be a non-empty list of {{stage: {{...}}}} items"
        )
    parsed = []
    for i, item in enumerate(stages):
        if not (isinstance(item, dict) and len(item) == 1):
            raise KompaktError(
                f"{where}: stages[{i}] must be a one-key mapping like {{train: {{epochs: 3}}}}"
            )
        ((name, values),) = item.items()
        if name not in _STAGES:
            raise KompaktError(
                f"{where}: stages[{i}]: unknown stage {name!r}; known: {', '.join(sorted(_STAGES))}"
            )
        if values is not None and not isinstance(values, dict):
            raise KompaktError(f"{where}: stages[{i}].{name} must be a mapping of config fields")
        config_cls, fn = _STAGES[name]
        parsed.append((name, fn, from_mapping(config_cls, values, f"{where}: stages[{i}].{name}")))
    return parsed


def run_pipeline(
    recipe_path: str | Path | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> PipelineState:
    """Run a recipe end to end; every stage config is validated before anything runs."""
    from kompakt.models import build

    where, recipe = load_recipe(recipe_path)
    stages = _parse_stages(where, recipe.get("stages"))
    model_spec = recipe.get("model")
    if not (isinstance(model_spec, dict) and "name" in model_spec):
        raise KompaktError(
            f"{where}: 'model' must be a mapping with a 'name' (and the factory's arguments)"
        )
    dataset = recipe.get("data", "fashion-mnist")
    if dataset not in DATASETS:
        raise KompaktError(f"{where}: unknown data {dataset!r}; known: {', '.join(DATASETS)}")
    torch.manual_seed(int(recipe.get("seed", 0)))
    kwargs = {k: v for k, v in model_spec.items() if k != "name"}
    state = PipelineState(
        Path(out or recipe.get("out") or "out/pipeline"),
        build(model_spec["name"], **kwargs),
        dataset,
        log,
    )
    for _name, fn, config in stages:
        fn(state, config)
    return state
