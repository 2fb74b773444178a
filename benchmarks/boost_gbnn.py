"""GBNN versus the same one-hidden-layer network trained whole (Adam, L-BFGS, SGD).

Every method fits Linear(d, H) -> sigmoid -> Linear(H, K) with the same width H and the same
tuning effort: three values of one hyperparameter (GBNN and L-BFGS: weight decay; Adam and
SGD: learning rate), chosen on a held-out 20% of the training fold (10% of the training
set for Fashion-MNIST), then refitted on the whole training fold (tabular sets only). Fixed
settings: tabular GBNN 1 unit per step (the paper's default) with eta 1 and 50 L-BFGS
iterations per step, Adam / SGD 200 epochs of batches of 64, whole L-BFGS 500 iterations;
Fashion-MNIST GBNN 8 units per step, eta 0.5, 100 iterations per step, Adam / SGD 20 epochs of
batches of 256, whole L-BFGS 200 iterations. Adam and SGD use weight decay 1e-4.

- scikit-learn's shipped sets (breast_cancer, wine, digits, iris: accuracy; diabetes: RMSE),
  k-fold cross-validation, features (and the regression target) standardized on the
  training fold.
- Fashion-MNIST features: the input of ``fc`` in the reference CNN (an artifact given with
  ``--artifact``, else the CNN is trained here for ``--cnn-epochs``). GBNN's accuracy and the
  head's latency with only the first units kept, next to the Adam network with its first
  units kept (whole training gives no order to switch units off in).

Writes ``benchmarks/results/boost_gbnn.jsonl`` (one row per measurement) and
``benchmarks/results/boost_gbnn.svg`` (accuracy and latency against units kept).

    .venv/bin/python benchmarks/boost_gbnn.py --artifact out/demo/dense
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn

import kompakt
from kompakt.compress import boost
from kompakt.data import fashion_mnist
from kompakt.eval import latency_ms
from kompakt.models import build
from kompakt.train import TrainConfig, train_classifier

RESULTS = Path(__file__).parent / "results"
TABULAR = {
    "breast_cancer": datasets.load_breast_cancer,
    "wine": datasets.load_wine,
    "digits": datasets.load_digits,
    "diabetes": datasets.load_diabetes,
    "iris": datasets.load_iris,
}
METHODS = ("gbnn", "adam", "lbfgs", "sgd")
GRID = {  # the one tuned hyperparameter per method, three values each
    "gbnn": ("weight_decay", (1e-3, 1e-2, 1e-1)),
    "adam": ("lr", (1e-3, 3e-3, 1e-2)),
    "sgd": ("lr", (0.01, 0.03, 0.1)),
    "lbfgs": ("weight_decay", (1e-4, 1e-3, 1e-2)),
}


# --- the four trainers --------------------------------------------------------------------


def fit(method, x, y, task, units, value, setting, seed):
    """A module mapping features to scores, trained by ``method`` with tuned ``value``."""
    if method == "gbnn":
        gbnn = boost.GBNN(
            task=task,
            units_per_step=setting["units_per_step"],
            steps=units // setting["units_per_step"],
            eta=setting["eta"],
            max_iter=setting["gbnn_iter"],
            weight_decay=value,
            patience=None,
            seed=seed,
        )
        return gbnn.fit(x, y, progress=False).to_module()
    torch.manual_seed(seed)
    k = int(y.max()) + 1 if task == "classification" else 1
    net = nn.Sequential(nn.Linear(x.shape[1], units), nn.Sigmoid(), nn.Linear(units, k))
    target = y if task == "classification" else y.reshape(-1, 1)
    loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    if method == "lbfgs":
        opt = torch.optim.LBFGS(
            net.parameters(),
            max_iter=setting["lbfgs_iter"],
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            penalty = net[0].weight.square().sum() + net[2].weight.square().sum()
            loss = loss_fn(net(x), target) + 0.5 * value * penalty
            loss.backward()
            return loss

        opt.step(closure)
        return net.eval()
    if method == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=value, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(
            net.parameters(), lr=value, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
    g = torch.Generator().manual_seed(seed)
    batch = setting["batch"]
    for _ in range(setting["epochs"]):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(net(x[idx]), target[idx]).backward()
            opt.step()
    return net.eval()


def score(module, x, y, task):
    """Accuracy (classification) or mean squared error on the standardized target."""
    with torch.no_grad():
        out = module(x)
    if task == "classification":
        return (out.argmax(1) == y).float().mean().item()
    return (out.reshape(-1) - y).square().mean().item()


def better(a, b, task):
    return a > b if task == "classification" else a < b


def tune_and_fit(method, x, y, task, units, setting, seed, refit=True, holdout=0.2):
    """Pick the grid value by held-out score, then refit on all of ``x`` (when ``refit``)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    cut = int(len(x) * holdout)
    val, tr = order[:cut], order[cut:]
    best = None
    for value in GRID[method][1]:
        module = fit(method, x[tr], y[tr], task, units, value, setting, seed)
        s = score(module, x[val], y[val], task)
        if best is None or better(s, best[0], task):
            best = (s, value, module)
    if not refit:
        return best[2], best[1]
    return fit(method, x, y, task, units, best[1], setting, seed), best[1]


# --- tabular sets ---------------------------------------------------------------------------


def tabular(args, emit):
    setting = {
        "units_per_step": 1,  # the paper's default: one unit per step, eta 1
        "eta": 1.0,
        "gbnn_iter": 50,
        "lbfgs_iter": 500,
        "epochs": 200,
        "batch": 64,
    }
    units = args.tabular_units
    for name, load in TABULAR.items():
        data = load()
        x_all = torch.tensor(data.data, dtype=torch.float32)
        task = "regression" if name == "diabetes" else "classification"
        if task == "classification":
            y_all = torch.tensor(data.target, dtype=torch.long)
            folds = StratifiedKFold(args.folds, shuffle=True, random_state=0).split(
                data.data, data.target
            )
        else:
            y_all = torch.tensor(data.target, dtype=torch.float32)
            folds = KFold(args.folds, shuffle=True, random_state=0).split(data.data)
        for fold, (tr, te) in enumerate(folds):
            tr, te = torch.as_tensor(tr), torch.as_tensor(te)
            mean, std = x_all[tr].mean(0), x_all[tr].std(0).clamp_min(1e-6)
            x_tr, x_te = (x_all[tr] - mean) / std, (x_all[te] - mean) / std
            y_tr, y_te = y_all[tr], y_all[te]
            if task == "regression":
                y_mean, y_std = y_tr.mean(), y_tr.std()
                y_tr, y_te = (y_tr - y_mean) / y_std, (y_te - y_mean) / y_std
            for method in METHODS:
                t0 = time.perf_counter()
                module, value = tune_and_fit(method, x_tr, y_tr, task, units, setting, fold)
                seconds = time.perf_counter() - t0
                s = score(module, x_te, y_te, task)
                metric = "accuracy" if task == "classification" else "rmse"
                value_out = s if task == "classification" else math.sqrt(s) * y_std.item()
                emit(
                    part="tabular",
                    dataset=name,
                    method=method,
                    fold=fold,
                    units=units,
                    metric=metric,
                    value=value_out,
                    tuned={GRID[method][0]: value},
                    tune_and_fit_s=seconds,
                    setting=setting,
                )
                print(
                    f"{name:14s} fold {fold} {method:6s} {metric} {value_out:.4f} ({seconds:.1f}s)"
                )


# --- Fashion-MNIST features ---------------------------------------------------------------


def cnn_features(args):
    if args.artifact:
        model = kompakt.load(args.artifact)
        source = str(args.artifact)
    else:
        torch.manual_seed(0)
        model = build("fmnist_resnet")
        images, labels = fashion_mnist("train")
        train_classifier(model, images, labels, TrainConfig(epochs=args.cnn_epochs))
        source = f"fmnist_resnet trained {args.cnn_epochs} epoch(s) here"
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    f_train = boost.head_features(model, "fc", train_x)
    f_test = boost.head_features(model, "fc", test_x)
    with torch.no_grad():
        fc_accuracy = (model.fc(f_test).argmax(1) == test_y).float().mean().item()
    return model, source, fc_accuracy, (f_train, train_y), (f_test, test_y)


def keep_first_units(net, units):
    """The whole-trained network with only its first ``units`` hidden units (bias unchanged)."""
    cut = nn.Sequential(
        nn.Linear(net[0].in_features, units), nn.Sigmoid(), nn.Linear(units, net[2].out_features)
    )
    with torch.no_grad():
        cut[0].weight.copy_(net[0].weight[:units])
        cut[0].bias.copy_(net[0].bias[:units])
        cut[2].weight.copy_(net[2].weight[:, :units])
        cut[2].bias.copy_(net[2].bias)
    return cut.eval()


def fashion(args, emit):
    model, source, fc_accuracy, (x, y), (x_test, y_test) = cnn_features(args)
    units, j = args.fmnist_units, args.fmnist_units_per_step
    setting = {
        "units_per_step": j,
        "eta": 0.5,
        "gbnn_iter": 100,
        "lbfgs_iter": 200,
        "epochs": 20,
        "batch": 256,
    }
    emit(
        part="fashion",
        dataset="fashion-mnist-features",
        method="cnn-fc",
        units=0,
        metric="accuracy",
        value=fc_accuracy,
        source=source,
    )
    print(f"fashion-mnist features from {source}: the CNN's own fc {fc_accuracy:.4f}")
    nets = {}
    for method in METHODS:
        t0 = time.perf_counter()
        module, value = tune_and_fit(
            method, x, y, "classification", units, setting, 0, refit=False, holdout=0.1
        )
        seconds = time.perf_counter() - t0
        acc = score(module, x_test, y_test, "classification")
        nets[method] = module
        emit(
            part="fashion",
            dataset="fashion-mnist-features",
            method=method,
            units=units,
            metric="accuracy",
            value=acc,
            tuned={GRID[method][0]: value},
            tune_and_fit_s=seconds,
            setting=setting,
        )
        print(
            f"fashion-mnist  {method:6s} accuracy {acc:.4f} ({seconds:.1f}s, {GRID[method][0]}={value})"
        )
    head = nets["gbnn"]
    for kept in range(j, units + 1, j):
        cut = head.truncate(kept)
        emit(
            part="fashion-units",
            dataset="fashion-mnist-features",
            method="gbnn",
            units=kept,
            metric="accuracy",
            value=score(cut, x_test, y_test, "classification"),
            latency_us_batch1=1000 * latency_ms(cut, x_test[:1], args.repeats, warmup=10),
            latency_us_batch1000=1000 * latency_ms(cut, x_test[:1000], args.repeats, warmup=10),
        )
        emit(
            part="fashion-units",
            dataset="fashion-mnist-features",
            method="adam-first-units",
            units=kept,
            metric="accuracy",
            value=score(keep_first_units(nets["adam"], kept), x_test, y_test, "classification"),
        )
    emit(
        part="fashion-units",
        dataset="fashion-mnist-features",
        method="cnn-backbone",
        units=0,
        metric="latency_us_batch1",
        value=1000 * latency_ms(model, fashion_mnist("test")[0][:1], args.repeats, warmup=10),
    )


# --- plot -----------------------------------------------------------------------------------


def svg_plot(rows, path):
    """Two panels drawn by hand: test accuracy and head latency against units kept."""
    gbnn = sorted(
        (r for r in rows if r.get("part") == "fashion-units" and r["method"] == "gbnn"),
        key=lambda r: r["units"],
    )
    adam = sorted(
        (r for r in rows if r.get("part") == "fashion-units" and r["method"] == "adam-first-units"),
        key=lambda r: r["units"],
    )
    if not gbnn:
        return
    width, height, pad = 900, 360, 60
    panel = (width - 3 * pad) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    max_units = gbnn[-1]["units"]

    def axes(x0, title, ylabel, lo, hi, series):
        y0, h = pad, height - 2 * pad
        parts.append(
            f'<text x="{x0 + panel / 2}" y="{pad - 25}" text-anchor="middle" font-size="14">{title}</text>'
        )
        parts.append(
            f'<rect x="{x0}" y="{y0}" width="{panel}" height="{h}" fill="none" stroke="#333"/>'
        )
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            yy = y0 + h - h * i / 4
            parts.append(f'<line x1="{x0}" x2="{x0 + panel}" y1="{yy}" y2="{yy}" stroke="#ddd"/>')
            parts.append(f'<text x="{x0 - 5}" y="{yy + 4}" text-anchor="end">{v:.3g}</text>')
        for i in range(5):
            u = max_units * i / 4
            xx = x0 + panel * i / 4
            parts.append(f'<text x="{xx}" y="{y0 + h + 16}" text-anchor="middle">{u:.0f}</text>')
        parts.append(
            f'<text x="{x0 + panel / 2}" y="{y0 + h + 36}" text-anchor="middle">hidden units kept</text>'
        )
        parts.append(
            f'<text x="{x0 - 45}" y="{y0 + h / 2}" transform="rotate(-90 {x0 - 45} {y0 + h / 2})" text-anchor="middle">{ylabel}</text>'
        )
        for k, (label, color, points) in enumerate(series):
            coords = " ".join(
                f"{x0 + panel * u / max_units:.1f},{y0 + h - h * (min(max(v, lo), hi) - lo) / (hi - lo):.1f}"
                for u, v in points
            )
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
            parts.append(
                f'<text x="{x0 + 10}" y="{y0 + 18 + 16 * k}" fill="{color}">{label}</text>'
            )

    acc_g = [(r["units"], r["value"]) for r in gbnn]
    acc_a = [(r["units"], r["value"]) for r in adam]
    lo = math.floor(min(v for _, v in acc_g + acc_a) * 10) / 10
    axes(
        pad,
        "Fashion-MNIST test accuracy (CNN features)",
        "accuracy",
        lo,
        1.0,
        [("GBNN, first units", "#1f77b4", acc_g), ("Adam network, first units", "#d62728", acc_a)],
    )
    batch1000 = [(r["units"], r["latency_us_batch1000"]) for r in gbnn]
    batch1 = [(r["units"], r["latency_us_batch1"]) for r in gbnn]
    axes(
        2 * pad + panel,
        "BoostedHead latency (median)",
        "microseconds",
        0,
        max(v for _, v in batch1000 + batch1) * 1.2,
        [("batch of 1000 rows", "#1f77b4", batch1000), ("batch of 1 row", "#2ca02c", batch1)],
    )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="a trained fmnist_resnet artifact (default: train one)")
    parser.add_argument("--cnn-epochs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tabular-units", type=int, default=32)
    parser.add_argument("--fmnist-units", type=int, default=256)
    parser.add_argument("--fmnist-units-per-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=300, help="timed forward passes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings)")
    parser.add_argument("--parts", default="tabular,fashion")
    parser.add_argument("--out", default=str(RESULTS / "boost_gbnn.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "benchmark": "boost_gbnn",
        "date": datetime.date.today().isoformat(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "benchmarks/boost_gbnn.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if v is not None and k != "out"
        ),
    }
    rows = []

    def emit(**row):
        rows.append({**common, **row})

    started = time.perf_counter()
    parts = args.parts.split(",")
    if "tabular" in parts:
        tabular(args, emit)
    if "fashion" in parts:
        fashion(args, emit)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    svg_plot(rows, out.with_suffix(".svg"))
    summarize(rows)
    print(f"wrote {out} ({len(rows)} rows) in {time.perf_counter() - started:.0f}s")


def summarize(rows):
    """Median over folds per data set and method, as a Markdown table."""
    table = {}
    for r in rows:
        if r["part"] in ("tabular", "fashion"):
            table.setdefault((r["dataset"], r["metric"]), {}).setdefault(r["method"], []).append(
                r["value"]
            )
    print("| data set | metric | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for (dataset, metric), by_method in table.items():
        cells = [f"{np.median(by_method[m]):.4f}" if m in by_method else "" for m in METHODS]
        print(f"| {dataset} | {metric} (median) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
