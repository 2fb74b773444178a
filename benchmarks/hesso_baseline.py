"""only-train-once's HESSO (the OTOv3 authors' package, 3.0.1) as a side-by-side baseline.

The package predates torch 2.13: three shims, applied here and nowhere else, let it run on
the CPU:

* ``torch.onnx._globals`` moved to ``torch.onnx._internal.torchscript_exporter._globals``;
* ``torch.onnx._optimize_graph`` is now ``torch.onnx.utils._optimize_graph``;
* HESSO puts a mask on the GPU with a hard-coded ``.cuda()``: ``Tensor.cuda`` returns the
  tensor itself while HESSO trains (and is restored after).

Install with ``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile

import torch
from torch import nn


def _import_oto():
    import torch.onnx.utils
    from torch.onnx._internal.torchscript_exporter import _globals

    sys.modules.setdefault("torch.onnx._globals", _globals)
    if not hasattr(torch.onnx, "_optimize_graph"):
        torch.onnx._optimize_graph = torch.onnx.utils._optimize_graph
    from only_train_once import OTO

    return OTO


@contextlib.contextmanager
def _cuda_is_cpu():
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real


def hesso_subnet(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    sparsity: float,
    epochs: int,
    start_epochs: float,
    pruning_epochs: float,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    pruning_periods: int = 10,
) -> nn.Module:
    """Train ``model`` from its current weights with HESSO (SGD variant, cosine learning rate,
    the same data order as kompakt's trainer) and return only-train-once's subnet."""
    from kompakt.train import TrainConfig, train_classifier

    OTO = _import_oto()
    oto = OTO(model=model, dummy_input=images[:1])
    steps_per_epoch = math.ceil(len(images) / batch_size)
    pruning_steps = max(1, int(pruning_epochs * steps_per_epoch))
    with _cuda_is_cpu():
        optimizer = oto.hesso(
            variant="sgd",
            lr=lr,
            first_momentum=momentum,
            weight_decay=weight_decay,
            target_group_sparsity=sparsity,
            start_pruning_step=int(start_epochs * steps_per_epoch),
            pruning_steps=pruning_steps,
            pruning_periods=min(pruning_periods, pruning_steps),  # a period is >= 1 step
        )
        config = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, schedule="cosine"
        )
        train_classifier(model, images, labels, config, progress=False, optimizer=optimizer)
    with tempfile.TemporaryDirectory() as out:
        oto.construct_subnet(out_dir=out)
        return torch.load(oto.compressed_model_path, weights_only=False).eval()
