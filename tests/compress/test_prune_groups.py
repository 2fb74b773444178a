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
