import pytest
import torch
from torch import nn

from kompakt.compress import prune
from kompakt.errors import KompaktError


def regression_problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(512, 10)
    y = (x[:, :3] @ torch.tensor([1.0, -2.0, 0.5])).unsqueeze(1) + 0.3 * torch.sin(3 * x[:, :1])
    model = nn.Sequential(
        nn.Linear(10, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 1)
    )
    return model, x, y


def train(model, opt, x, y, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


@pytest.mark.parametrize("variant, lr", [("sgd", 0.05), ("adam", 2e-3)])
def test_dhspg_reaches_the_target_with_exact_zeros(variant, lr):
    model, x, y = regression_problem()
    oto = prune.OTO(model, (x[:4],))
    opt = oto.dhspg(
        lr=lr, variant=variant, target_group_sparsity=0.6, start_pruning_step=150, pruning_steps=300
    )
    loss = train(model, opt, x, y, 700)
    target = round(0.6 * len(oto.prunable))
    zeroed = oto.zeroed_groups()
    assert len(zeroed) == target == int(opt.zero.sum())
    assert opt.group_sparsity == pytest.approx(target / len(oto.prunable))
    params = dict(model.named_parameters())
    for gid in zeroed:  # every slice of a zeroed group is exactly zero
        for name, dim, idx in oto.groups[gid].slices:
            if name in params:
                assert (
                    torch.count_nonzero(params[name].index_select(dim, torch.as_tensor(idx))) == 0
                )
    assert loss < 0.5 * y.var().item()  # the pruned model still fits the data
    small = oto.construct_subnet()
    assert prune.count_params(small) < 0.6 * prune.count_params(model)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_dhspg_plain_before_the_split_and_never_empties_a_layer():
    model, x, y = regression_problem()
    oto = prune.OTO(model, (x[:4],))
    opt = oto.dhspg(lr=0.05, target_group_sparsity=0.99, start_pruning_step=20, pruning_steps=50)
    train(model, opt, x, y, 20)
    assert not opt.redundant.any() and not opt.zero.any()
    train(model, opt, x, y, 60)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert (p.abs().sum(1) > 0).any(), f"{name} lost every row"
    assert 0 < opt.group_sparsity < 0.99


def test_dhspg_config_is_validated():
    model, x, _ = regression_problem()
    oto = prune.OTO(model, (x[:4],))
    with pytest.raises(KompaktError, match="unknown field.*sparsity"):
        oto.dhspg(sparsity=0.5)
    with pytest.raises(KompaktError, match="epsilon must be in"):
        oto.dhspg(epsilon=1.5)


def test_dhspg_split_scores_magnitude_per_element_not_per_group_size():
    """Two layers' hidden units, every step along the parameters (equal cosines): the units
    of 69 elements have a root mean square of 1, those of 7 elements 0.89 (their mean
    magnitude is the larger, 0.34 against 0.12). The split calls the 7-element units redundant;
    a mean-magnitude score would pick the large ones for their size."""
    model = nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[4].weight.fill_(0.5)
    oto = prune.OTO(model, (torch.randn(2, 64),))
    opt = oto.dhspg(lr=1e-3, momentum=0.0, target_group_sparsity=0.25, start_pruning_step=0)
    for p in model.parameters():
        p.grad = p.detach().clone()
    opt.step()
    small = {g.id for g in oto.prunable if any(n == "2.weight" and d == 0 for n, d, _ in g.slices)}
    assert len(small) == 4 and len(oto.prunable) == 8
    assert set(opt.redundant.nonzero().flatten().tolist()) < small
    assert int(opt.redundant.sum()) == 2
