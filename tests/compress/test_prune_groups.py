import pytest
import torch

from kompakt.compress import prune
from kompakt.compress.prune.oto import run
from tests.compress.prune_models import ARCHITECTURES, build


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_zeroed_groups_removed_give_the_same_outputs(name, fraction):
    model, make = build(name)
    oto = prune.OTO(model, make(3))
    assert oto.prunable, f"{name}: no prunable group ({oto.messages})"
    before = prune.count_params(model)
    chosen = oto.zero_groups(fraction, seed=1)
    assert chosen and set(oto.zeroed_groups()) >= set(chosen)
    small = oto.construct_subnet()
    inputs = make(5)  # another batch size than the traced one
    for full, sub in zip(run(model, inputs), run(small, inputs), strict=True):
        assert full.shape == sub.shape
        torch.testing.assert_close(sub, full, atol=1e-5, rtol=1e-5)
    assert prune.count_params(small) < before


@pytest.mark.parametrize(
    "name, at_least", [("fmnist_resnet", 3), ("vit_block", 1), ("llama_gqa", 2)]
)
def test_erased_branches_are_not_computed_and_outputs_stay_the_same(name, at_least):
    from kompakt.compress.prune.erase import ErasedBranch

    model, make = build(name)
    oto = prune.OTO(model, make(3))
    assert len(oto.erasable) >= at_least
    flops = prune.count_flops(model, make(2))
    chosen = oto.zero_groups(1.0, seed=0, kind="erase")  # as many as keep the network connected
    assert chosen
    small = oto.construct_subnet()
    assert sum(isinstance(m, ErasedBranch) for m in small.modules()) == len(chosen)
    inputs = make(4)
    for full, sub in zip(run(model, inputs), run(small, inputs), strict=True):
        torch.testing.assert_close(sub, full, atol=1e-5, rtol=1e-5)
    assert prune.count_flops(small, make(2)) < flops


def test_erasing_never_disconnects_the_network():
    model, make = build("fmnist_resnet")
    oto = prune.OTO(model, make(2))
    ids = [g.id for g in oto.erasable]
    # the downsampling blocks have two erasable operands (main branch and shortcut): at most one goes
    assert len(oto.connected(ids)) < len(ids)
    by_add = {}
    for g in oto.connected(ids):
        by_add.setdefault(oto.branches[g].add, []).append(g)
    assert all(len(v) == 1 for v in by_add.values())
