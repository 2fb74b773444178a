"""OTOv3 erasing mode (H2SPG) on a deeper residual Fashion-MNIST CNN against its dense baseline.

The net is the reference ResNet with 4 residual blocks per stage (12 blocks). Both runs get
the same epoch budget and the same seeded initial weights; H2SPG trains from scratch and
erases the chosen residual branches, with no fine-tuning after. Reports top-1, blocks
erased, FLOPs, parameters and eager CPU latency.

    .venv/bin/python benchmarks/prune_erase.py --epochs 3 --out benchmarks/results/prune_erase.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch
from prune_cnn import (
    add_common_args,
    caption,
    prepare,
    record,
)  # run as a script: prune_cnn.py sits beside it

from kompakt.compress.prune import count_flops, count_params
from kompakt.compress.prune.classifier import PruneConfig, prune_classifier
from kompakt.eval import accuracy, latency_ms
from kompakt.models import build
from kompakt.train import TrainConfig, train_classifier

BLOCKS = 4


def fresh(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("fmnist_resnet", blocks_per_stage=BLOCKS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--targets", type=float, nargs="+", default=[0.4], help="fractions of erasable branches"
    )
    add_common_args(parser, "prune_erase")
    args = parser.parse_args()
    (images, labels), test, meta = prepare(args)
    example = (torch.randn(1, 1, 28, 28),)

    def row(name, model, seconds, **extra):
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

    rows = []
    start = time.perf_counter()
    dense = fresh(args.seed)
    train_classifier(
        dense,
        images,
        labels,
        TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed),
        progress=False,
    )
    record(
        args.out,
        meta,
        rows,
        row("dense", dense, time.perf_counter() - start, blocks=3 * BLOCKS, erased=0),
    )
    for target in args.targets:
        start = time.perf_counter()
        config = PruneConfig(
            mode="erase",
            target_group_sparsity=target,
            epochs=args.epochs,
            start_epochs=0.1 * args.epochs,  # the split of benchmarks/prune_cnn.py
            pruning_epochs=0.3 * args.epochs,
            lr=args.lr,
            seed=args.seed,
        )
        subnet, metrics = prune_classifier(fresh(args.seed), images, labels, config, progress=False)
        record(
            args.out,
            meta,
            rows,
            row(
                f"kompakt H2SPG erase {target:.0%} of branches",
                subnet,
                time.perf_counter() - start,
                blocks=3 * BLOCKS,
                erased=metrics["erased_branches"],
                erasable=metrics["erasable_groups"],
                forced=metrics["groups_projected_at_budget_end"],
            ),
        )
    base = caption(meta, rows)
    print(
        "| method | top-1 | Δ vs dense | branches erased | FLOPs | params | latency b1 (ms) | latency b64 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['top1']:.2%} | {100 * (r['top1'] - base['top1']):+.2f} pt | "
            f"{r['erased']} of {r['blocks']} blocks | {r['flops'] / 1e6:.2f}M | {r['params']:,} | "
            f"{r['latency_b1_ms']:.2f} | {r['latency_b64_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
