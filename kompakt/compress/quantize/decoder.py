"""Quantize a decoder language model (transformers Llama family) one block at a time.

The calibration token windows are embedded once; then for each decoder block the fp weights
are loaded (from memory, or streamed from a safetensors checkpoint by
:func:`quantize_checkpoint`), the input moments of its Linear layers are collected on the
current hidden states, the layers are quantized, and the hidden states are pushed through the
quantized block to calibrate the next one. Peak memory is one fp block plus the calibration
activations plus the already compressed blocks.

With ``work_dir`` every finished block is written there (its tensors, the hidden states after
it, and ``progress.json`` last, each atomically), and a later call with the same config and
calibration resumes after the last finished block; the result is bit-identical to an
uninterrupted run. The tied input embedding / ``lm_head`` table is quantized last, as
``lm_head`` calibrated on the final hidden states, and the embedding shares its codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from kompakt import artifact
from kompakt.compress.quantize.block_tuning import logits_kl, relative_mse, tune_codebooks
from kompakt.compress.quantize.calibration import InputMoments, record_inputs
from kompakt.compress.quantize.config import BitBudget, QuantizeConfig, quantizable, quantize_weight
from kompakt.compress.quantize.layers import (
    CodebookEmbedding,
    CodedLayer,
    coded_layer_for,
    replay,
    summarize,
    weight_matrix,
)
from kompakt.config import to_dict
from kompakt.errors import KompaktError

PROGRESS_FILE = "progress.json"
BATCH = 4  # calibration windows per block forward
TUNING_BATCH = 2  # calibration windows per step of the block phase


def is_decoder_lm(model: nn.Module) -> bool:
    base = getattr(model, "model", None)
    return all(
        hasattr(base, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")
    ) and hasattr(model, "lm_head")


def _causal_mask(seq: int) -> torch.Tensor:
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]


def _block_forward(
    block: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    return block(hidden, attention_mask=_causal_mask(hidden.shape[1]), position_embeddings=rope)


def _run_block(
    block: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                _block_forward(block, hidden[start : start + BATCH], rope)
                for start in range(0, hidden.shape[0], BATCH)
            ]
        )


@contextmanager
def _timed(reports: dict[str, dict[str, Any]], phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``reports["phases"][phase]`` (seconds; kept
    with the reports, so a resumed run counts its earlier blocks too)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases = reports.setdefault("phases", {})
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t0


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """The work directory of a resumable run: finished blocks, hidden states, plan so far."""

    def __init__(self, work_dir: Path, fingerprint: str) -> None:
        self.dir = work_dir
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any] | None:
        path = self.dir / PROGRESS_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise KompaktError(
                f"{path}: this work directory belongs to a run with another config, model or "
                "calibration; use a new --work-dir or delete it to start over"
            )
        return state

    def save(
        self,
        block: int,
        module: nn.Module,
        streams: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
        _write_atomic(self.dir / f"block_{block:04d}.safetensors", lambda p: save_file(tensors, p))
        _write_atomic(self.dir / f"hidden_{block:04d}.safetensors", lambda p: save_file(streams, p))
        payload = json.dumps(
            {**state, "fingerprint": self.fingerprint, "blocks_done": block + 1}, indent=1
        )
        _write_atomic(self.dir / PROGRESS_FILE, lambda p: Path(p).write_text(payload))
        old = self.dir / f"hidden_{block - 1:04d}.safetensors"
        old.unlink(missing_ok=True)

    def restore_block(self, block: int, module: nn.Module) -> None:
        module.load_state_dict(
            load_file(str(self.dir / f"block_{block:04d}.safetensors")), assign=True
        )

    def streams(self, block: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / f"hidden_{block:04d}.safetensors"))


def quantize_decoder(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: torch.Tensor,
    *,
    load_block: Callable[[int, nn.Module], None] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    source_fingerprint: str = "",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Quantize ``model``'s blocks and its token table in place; returns per-layer reports.

    ``calibration`` is a ``[windows, seq]`` tensor of token ids. ``load_block(i, block)``
    materialises block ``i``'s fp weights before it is quantized (streaming).
    """
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise KompaktError(
            f"decoder calibration must be token ids [windows, seq] (int64), got {tuple(calibration.shape)} "
            f"{calibration.dtype}"
        )
    base = model.model
    record = artifact.record_of(model)
    seq = calibration.shape[1]
    with torch.no_grad():
        embedded = base.embed_tokens(calibration).float()
        rope = base.rotary_emb(embedded[:1], torch.arange(seq)[None])
    hidden = embedded[: config.block_windows]  # the per-block phases' windows
    # JLCM's block phase matches each quantized block to the fp model's: both streams are
    # kept, the fp one over every window when the model phase learns from them all
    tuning = config.method == "jlcm" and config.block_epochs > 0
    fp_hidden = embedded if config.model_epochs > 0 else hidden
    streams = {"hidden": hidden, "fp_hidden": fp_hidden} if tuning else {"hidden": hidden}
    budget = BitBudget(config.bits)
    # RTN at a whole width reads no calibration data (its codes are the rounded weights; the
    # input moments would only score them, and its errors are then the weights' own); the
    # bit allocation of a fractional width needs them
    calibrated = config.method != "rtn" or not budget.uniform
    head = not config.skips("lm_head")
    tied = model.lm_head.weight is base.embed_tokens.weight
    # the token table (a fifth of a small LM) is sensitive: it gets the wider code when the
    # budget allows, paid for by the blocks
    table = model.lm_head.weight.numel() if head else 0
    block_weights = len(base.layers) * sum(
        m.weight.numel() for m in quantizable(base.layers[0], config, "model.layers.0.").values()
    )
    head_width = budget.low
    if not budget.uniform and budget.fraction * (block_weights + table) >= table:
        head_width = budget.low + 1
        budget.carry = (budget.fraction - 1) * table

    fingerprint = hashlib.sha256(
        json.dumps([to_dict(config), source_fingerprint]).encode()
        + calibration.contiguous().numpy().tobytes()
    ).hexdigest()
    saved = _Progress(Path(work_dir), fingerprint) if work_dir is not None else None
    state = saved.load() if saved else None
    reports: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []  # plan entries of the finished blocks
    start = 0
    if state:
        start, budget.carry = state["blocks_done"], state["carry"]
        reports, done = state["reports"], state["plan"]
        for entry in done:
            replay(model, entry)
        for i in range(start):
            saved.restore_block(i, base.layers[i])
        record.plan.extend(done)
        streams = saved.streams(start - 1)

    n_blocks = len(base.layers)
    bar = tqdm(
        range(start, n_blocks), desc=f"quantize {config.method}", unit="block", disable=not progress
    )
    for i in bar:
        block = base.layers[i]
        if load_block is not None:
            load_block(i, block)
        prefix = f"model.layers.{i}."
        layers = quantizable(block, config, prefix)
        hidden = streams["hidden"]
        if tuning:
            with _timed(reports, "fp_stream"):
                streams["fp_hidden"] = _run_block(block, streams["fp_hidden"], rope)
        hs = dict.fromkeys(layers)
        if calibrated:
            with _timed(reports, "moments"), record_inputs(layers) as moments:
                _run_block(block, hidden, rope)
            hs = {n: moments[n].hessian() for n in layers}
        widths = budget.allocate(
            {n: (weight_matrix(m), hs[n]) for n, m in layers.items()}, config.block
        )
        entries = []
        for name, module in layers.items():
            t0 = time.perf_counter()
            bar.set_postfix_str(name)
            coded, info = quantize_weight(weight_matrix(module), hs[name], widths[name], config)
            layer = coded_layer_for(module, coded, config.method)
            block.set_submodule(name, layer)
            entries.append(layer.plan_entry(prefix + name))
            reports[prefix + name] = {
                **info,
                "bits": widths[name],
                "seconds": time.perf_counter() - t0,
            }
        if tuning:
            with _timed(reports, "block_phase"):
                result = tune_codebooks(
                    [block.get_submodule(name) for name in layers],
                    lambda x, block=block: _block_forward(block, x, rope),
                    hidden,
                    relative_mse(streams["fp_hidden"][: len(hidden)]),
                    config.block_epochs,
                    config.block_lr,
                    TUNING_BATCH,
                    config.block_map_lr,
                    norms=_norm_weights(block) if config.block_norms else [],
                )
            for name in layers:
                reports[prefix + name].update(
                    block_error_before=result["before"],
                    block_error_after=result["after"],
                    block_codes_changed=result["codes_changed"],
                )
        if calibrated:
            with _timed(reports, "moments"):
                streams["hidden"] = _run_block(block, hidden, rope)
        record.plan.extend(entries)
        done.extend(entries)
        if saved:
            saved.save(i, block, streams, {"carry": budget.carry, "reports": reports, "plan": done})

    fp_weight = weight_matrix(model.lm_head)
    if tuning:  # the fp model's next-token distributions: the head and model phases' target
        with torch.no_grad():
            fp_features = base.norm(streams["fp_hidden"])
        fp_logits = logits_kl(fp_features, fp_weight)
    if head:
        h_head = None
        if calibrated:
            # lm_head's input moments straight from the final hidden states (not its logits)
            moments = InputMoments(model.lm_head)
            with torch.no_grad():
                moments.add(base.norm(streams["hidden"]))
            h_head = moments.hessian()
        t0 = time.perf_counter()
        coded, info = quantize_weight(fp_weight, h_head, head_width, config)
        lm_head = coded_layer_for(model.lm_head, coded, config.method)
        if tuning:
            result = tune_codebooks(
                [lm_head],
                lambda x: lm_head(base.norm(x)),
                streams["hidden"],
                fp_logits,
                config.block_epochs,
                config.block_lr,
                1,
                config.block_map_lr,
                norms=_norm_weights(base.norm) if config.block_norms else [],
            )
            info.update(
                kl_before=result["before"],
                kl_after=result["after"],
                block_codes_changed=result["codes_changed"],
            )
        model.lm_head = lm_head
        record.plan.append(lm_head.plan_entry("lm_head"))
        reports["lm_head"] = {**info, "bits": head_width, "seconds": time.perf_counter() - t0}
        if tied:
            embed = _shared_embedding(lm_head, base.embed_tokens)
            base.embed_tokens = embed
            record.plan.append(embed.plan_entry("model.embed_tokens"))
    if not tied and not config.skips("model.embed_tokens"):
        table = base.embed_tokens
        coded, info = quantize_weight(weight_matrix(table), None, budget.low, config)
        base.embed_tokens = coded_layer_for(table, coded, config.method)
        record.plan.append(base.embed_tokens.plan_entry("model.embed_tokens"))
        reports["model.embed_tokens"] = {**info, "bits": budget.low}
    if tuning and config.model_epochs > 0:
        with _timed(reports, "model_phase"):
            result = tune_codebooks(
                [m for m in model.modules() if isinstance(m, CodedLayer)],
                _checkpointed_logits(model, rope),
                calibration,
                fp_logits,
                config.model_epochs,
                config.model_lr,
                1,
                config.model_map_lr,
                norms=_norm_weights(base) if config.block_norms else [],
                check=_check_windows(len(calibration), config.block_windows),
            )
        reports["model"] = {
            "kl_before": result["before"],
            "kl_after": result["after"],
            "codes_changed": result["codes_changed"],
        }
    return reports


def _check_windows(windows: int, block_windows: int | None) -> torch.Tensor | None:
    """The windows of the model phase's keep-if-better check: as many as the per-block phases
    calibrated on, from the end of the calibration set, which those phases did not fit (a
    check on their own windows is biased toward the state they left); all windows (None)
    where the two would overlap."""
    if block_windows is None or 2 * block_windows > windows:
        return None
    return torch.arange(windows - block_windows, windows)


def _checkpointed_logits(
    model: nn.Module, rope: tuple[torch.Tensor, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's logits for token ids, each block under a gradient checkpoint: its decoded
    weights and activations exist only while it runs forward, and again while its gradient
    is computed, so the model phase holds one block at a time as the block phase does."""
    base = model.model

    def forward(ids: torch.Tensor) -> torch.Tensor:
        hidden = base.embed_tokens(ids).float()
        for block in base.layers:
            hidden = checkpoint(_block_forward, block, hidden, rope, use_reentrant=False)
        return model.lm_head(base.norm(hidden))

    return forward


def _norm_weights(module: nn.Module) -> list[nn.Parameter]:
    """The normalisation weights of ``module`` (what stays dense in a quantized block)."""
    return [
        p
        for m in module.modules()
        if "norm" in type(m).__name__.lower()
        for p in m.parameters(recurse=False)
    ]


def _shared_embedding(lm_head: CodedLayer, table: nn.Embedding) -> CodebookEmbedding:
    """An embedding reading the same coded tensors as the tied ``lm_head``."""
    embed = CodebookEmbedding(
        table.num_embeddings, table.embedding_dim, table.padding_idx, lm_head.layout
    )
    for name in ("codes", "codebook", "row_group", "scales", "offsets"):
        setattr(embed, name, getattr(lm_head, name))
    return embed


# --- streaming from a checkpoint ---------------------------------------------------------


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single file or a sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise KompaktError(
            f"{folder}: no model.safetensors (or index); save the model with save_pretrained"
        )
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    missing = [n for n in names if n not in files]
    if missing:
        raise KompaktError(
            f"checkpoint lacks tensor {missing[0]!r}; is it a {len(names)}-tensor Llama checkpoint?"
        )
    out = {}
    for name in names:
        with safe_open(str(files[name]), "pt") as f:
            out[name] = f.get_tensor(name).float()
    return out


def _materialise(module: nn.Module, files: dict[str, Path], prefix: str) -> None:
    names = list(module.state_dict())
    tensors = _read(files, [prefix + n for n in names])
    module.load_state_dict({n: tensors[prefix + n] for n in names}, assign=True)


def _file_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def quantize_checkpoint(
    folder: str | os.PathLike[str],
    config: QuantizeConfig,
    calibration: torch.Tensor,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize the transformers checkpoint in ``folder`` (``config.json`` + safetensors),
    reading one decoder block at a time; returns the quantized model with its step recorded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise KompaktError(
            f"{folder}: no config.json; point at a folder written by save_pretrained"
        )
    hf_config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        model.tie_weights()  # transformers 5.0 builds the LM head untied from a config
    if not is_decoder_lm(model):
        raise KompaktError(f"{folder}: {type(model).__name__} is not a Llama-family decoder model")
    files = _checkpoint_files(folder)
    base = model.model
    tied = model.lm_head.weight is base.embed_tokens.weight
    _materialise(base.embed_tokens, files, "model.embed_tokens.")
    _materialise(base.norm, files, "model.norm.")
    if tied:
        model.lm_head.weight = base.embed_tokens.weight
    else:
        _materialise(model.lm_head, files, "lm_head.")
    base.rotary_emb = type(base.rotary_emb)(config=hf_config)

    record = artifact.record_of(model)
    record.source_sha256 = _file_sha256(list(files.values()))
    with artifact.step(model, config.method, to_dict(config), inputs=calibration[:2]) as metrics:
        t0 = time.perf_counter()
        reports = quantize_decoder(
            model,
            config,
            calibration,
            load_block=lambda i, block: _materialise(block, files, f"model.layers.{i}."),
            work_dir=work_dir,
            source_fingerprint=record.source_sha256,
            progress=progress,
        )
        metrics.update(summarize(model, reports, time.perf_counter() - t0))
    return model.eval()
