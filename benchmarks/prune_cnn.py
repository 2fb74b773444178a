"""OTOv3 pruning of the Fashion-MNIST CNN against a dense baseline and Torch-Pruning.

Every method gets the same total epoch budget and starts from the same seeded initial
weights:

* dense: SGD (one-cycle) for the whole budget;
* kompakt DHSPG at each group sparsity (``--sparsities``) and each FLOPs reduction target
  (``--flops-reductions``): trains from scratch with DHSPG (warm-up of 10% of the budget,
  pruning window of 30%, or the shares given by ``--schedule``; the rest with the pruned
  groups held at zero), then builds the subnet; no fine-tuning after;
* Torch-Pruning (magnitude, L2): dense training for half the budget, one-shot global
  magnitude pruning to the FLOPs of each kompakt subnet, fine-tuning for the other half;
* only-train-once HESSO (the OTOv3 authors' package, with the shims of
  ``hesso_baseline.py``) at the same group sparsity or at ``--hesso-sparsities``, with
  DHSPG's schedule (warm-up 10%, pruning window 30% in 10 periods, cosine learning rate),
  then its own subnet; its FLOPs follow from its own groups, so they differ from kompakt's at
  the same sparsity (a higher HESSO sparsity brings them near).

Reports top-1 on the test split, FLOPs and parameters (torch's counter), and eager CPU
latency (median over repeats) at batch 1 and 64. Rows go to a JSONL file; a markdown table
is printed.

    .venv/bin/pip install -e '.[bench]'   # Torch-Pruning and only-train-once, the baselines
    .venv/bin/python benchmarks/prune_cnn.py --epochs 3 --out benchmarks/results/prune_cnn.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from kompakt.compress.prune import count_flops, count_params
from kompakt.compress.prune.classifier import PruneConfig, prune_classifier
from kompakt.data import fashion_mnist
from kompakt.eval import accuracy, latency_ms
from kompakt.models import build
from kompakt.train import SCHEDULES, TrainConfig, train_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hesso_baseline import hesso_subnet  # noqa: E402


def measure(name: str, model: torch.nn.Module, test, seconds: float, **extra) -> dict:
    example = (torch.randn(1, 1, 28, 28),)
    return {
        "method": name,
        "top1": accuracy(model, *test),
        "flops": count_flops(model, example),
        "params": count_params(model),
        "latency_b1_ms": latency_ms(model, torch.randn(1, 1, 28, 28)),
        "latency_b64_ms": latency_ms(model, torch.randn(64, 1, 28, 28)),
        "train_seconds": seconds,
        **extra,
    }


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """Arguments every pruning benchmark takes."""
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", type=int, default=None, help="train on the first N examples only"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads for training and latency"
    )
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{name}.jsonl"))


def prepare(args: argparse.Namespace) -> tuple[tuple, tuple, dict]:
    """Set the threads; return the train and test data and the rows' shared fields."""
    torch.set_num_threads(args.threads)
    images, labels = fashion_mnist("train")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    meta = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "epochs": args.epochs,
        "seed": args.seed,
        "command": " ".join(sys.argv),
    }
    return (images, labels), fashion_mnist("test"), meta


def record(out: Path, meta: dict, rows: list[dict], row: dict) -> None:
    """Add ``row`` to ``rows``, print it and append it (with ``meta``) to the JSONL file
    ``out`` at once, so a run cut short keeps the rows it finished."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({**meta, **row}) + "\n")


def caption(meta: dict, rows: list[dict]) -> dict:
    """Print the table's caption; returns the first row (the baseline)."""
    print(
        f"\n{meta['date']}, {meta['machine']}, budget {meta['epochs']} epochs, `{meta['command']}`\n"
    )
    return rows[0]


def fresh(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("fmnist_resnet")


def torch_pruning_baseline(seed, train, test, epochs, target_flops, lr):
    import torch_pruning as tp

    start = time.perf_counter()
    model = fresh(seed)
    half = max(1, epochs // 2)
    train_classifier(model, *train, TrainConfig(epochs=half, lr=lr, seed=seed), progress=False)
    example = torch.randn(1, 1, 28, 28)

    def pruned(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(
            m,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            global_pruning=True,
            ignored_layers=[m.fc],
        )
        pruner.step()
        return m

    lo, hi = 0.0, 0.95  # bisect the global ratio to match the kompakt subnet's FLOPs
    for _ in range(12):
        mid = (lo + hi) / 2
        if count_flops(pruned(mid), (example,)) > target_flops:
            lo = mid
        else:
            hi = mid
    model = pruned(hi)
    train_classifier(
        model, *train, TrainConfig(epochs=epochs - half, lr=lr / 2, seed=seed + 1), progress=False
    )
    return model, time.perf_counter() - start, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="total epoch budget of every method")
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.7, 0.8])
    parser.add_argument(
        "--flops-reductions",
        type=float,
        nargs="*",
        default=[],
        help="DHSPG runs that target a share of FLOPs removed instead of a group sparsity",
    )
    parser.add_argument(
        "--pruning-periods",
        type=int,
        nargs="+",
        default=[1],
        help="DHSPG runs each target once per value: the pruning window's number of splits",
    )
    parser.add_argument(
        "--schedule",
        type=float,
        nargs=2,
        default=[0.1, 0.3],
        metavar=("WARMUP", "WINDOW"),
        help="DHSPG's (and HESSO's) warm-up and pruning window as shares of the budget",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default="cosine",
        help="DHSPG's learning-rate schedule (dense and Torch-Pruning train with onecycle)",
    )
    parser.add_argument(
        "--nesterov", action="store_true", help="DHSPG's SGD with Nesterov momentum, as dense's"
    )
    parser.add_argument(
        "--hesso-sparsities",
        type=float,
        nargs="*",
        help="HESSO's group sparsities (default: --sparsities; none: no HESSO); its groups are "
        "not kompakt's, so a higher sparsity brings its FLOPs near DHSPG's",
    )
    add_common_args(parser, "prune_cnn")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(
            "--epochs must be >= 2: Torch-Pruning trains half the budget, then fine-tunes half"
        )
    train, test, meta = prepare(args)
    rows = []

    start = time.perf_counter()
    dense = fresh(args.seed)
    train_classifier(
        dense, *train, TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed), progress=False
    )
    record(args.out, meta, rows, measure("dense", dense, test, time.perf_counter() - start))

    schedule = PruneConfig(
        epochs=args.epochs,
        # by default split early, shrink the redundant groups over 30% of the budget, then
        # train the remaining groups: at 3 epochs this beat 0.4 / 0.35 by 0.3-0.7 pt
        start_epochs=args.schedule[0] * args.epochs,
        pruning_epochs=args.schedule[1] * args.epochs,
        lr=args.lr,
        seed=args.seed,
        schedule=args.lr_schedule,
        nesterov=args.nesterov,
    )
    targets = [(f"s={s}", {"target_group_sparsity": s}) for s in args.sparsities] + [
        (f"FLOPs -{f:.0%}", {"target_flops_reduction": f}) for f in args.flops_reductions
    ]
    targets = [
        (label + (f", {p} periods" if p > 1 else ""), {**target, "pruning_periods": p})
        for label, target in targets
        for p in args.pruning_periods
    ]
    for label, target in targets:
        start = time.perf_counter()
        config = dataclasses.replace(schedule, **target)
        subnet, metrics = prune_classifier(fresh(args.seed), *train, config, progress=False)
        record(
            args.out,
            meta,
            rows,
            measure(
                f"kompakt DHSPG {label}",
                subnet,
                test,
                time.perf_counter() - start,
                group_sparsity=metrics["group_sparsity"],
                forced=metrics["groups_projected_at_budget_end"],
            ),
        )
        model, seconds, ratio = torch_pruning_baseline(
            args.seed, train, test, args.epochs, rows[-1]["flops"], args.lr
        )
        record(
            args.out,
            meta,
            rows,
            measure(
                f"Torch-Pruning magnitude @ FLOPs of DHSPG {label}",
                model,
                test,
                seconds,
                tp_ratio=ratio,
            ),
        )

    hesso_sparsities = args.sparsities if args.hesso_sparsities is None else args.hesso_sparsities
    for sparsity in hesso_sparsities:
        start = time.perf_counter()
        hesso = hesso_subnet(
            fresh(args.seed),
            *train,
            sparsity=sparsity,
            epochs=args.epochs,
            start_epochs=schedule.start_epochs,
            pruning_epochs=schedule.pruning_epochs,
            lr=args.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
            batch_size=schedule.batch_size,
            seed=args.seed,
        )
        record(
            args.out,
            meta,
            rows,
            measure(
                f"only-train-once HESSO s={sparsity}", hesso, test, time.perf_counter() - start
            ),
        )

    base = caption(meta, rows)
    print(
        "| method | top-1 | Δ vs dense | FLOPs | FLOPs removed | params | latency b1 (ms) | latency b64 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['top1']:.2%} | {100 * (r['top1'] - base['top1']):+.2f} pt | {r['flops'] / 1e6:.2f}M | "
            f"{1 - r['flops'] / base['flops']:.0%} | {r['params']:,} | {r['latency_b1_ms']:.2f} | {r['latency_b64_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
