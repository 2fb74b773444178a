import copy

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


def train(model, opt, x, y, steps, seed=0, schedule=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
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


@pytest.mark.parametrize("nesterov", [False, True])
def test_dhspg_before_the_split_steps_as_torch_sgd_under_onecycle(nesterov):
    # OneCycleLR cycles the learning rate and the momentum, which DHSPG must follow
    model, x, y = regression_problem()
    reference = copy.deepcopy(model)
    oto = prune.OTO(model, (x[:4],))
    settings = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3)
    optimizers = [
        oto.dhspg(**settings, start_pruning_step=100),
        torch.optim.SGD(reference.parameters(), **settings),
    ]
    for net, opt in zip([model, reference], optimizers, strict=True):
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30)
        train(net, opt, x, y, 30, schedule=schedule)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_dhspg_config_is_validated():
    model, x, _ = regression_problem()
    oto = prune.OTO(model, (x[:4],))
    with pytest.raises(KompaktError, match="unknown field.*sparsity"):
        oto.dhspg(sparsity=0.5)
    with pytest.raises(KompaktError, match="nesterov needs variant sgd"):
        oto.dhspg(variant="adam", nesterov=True)
    with pytest.raises(KompaktError, match="epsilon must be in"):
        oto.dhspg(epsilon=1.5)
    with pytest.raises(KompaktError, match="pruning_periods must be in"):
        oto.dhspg(pruning_steps=4, pruning_periods=5)


def test_dhspg_periods_add_redundant_groups_rescored_at_each_split():
    """Three periods: a third of the target joins the redundant set at each split, chosen among
    the remaining groups by their scores then; a group made tiny just before the second split
    is picked by it. All are exactly zero by the end of the window."""
    model, x, y = regression_problem()
    oto = prune.OTO(model, (x[:4],))
    opt = oto.dhspg(
        lr=0.05,
        target_group_sparsity=0.5,
        start_pruning_step=10,
        pruning_steps=90,
        pruning_periods=3,
    )
    target = round(0.5 * len(oto.prunable))
    sizes, sets = [], []
    params = dict(model.named_parameters())
    for step in range(120):
        train(model, opt, x, y, 1, seed=step)
        sizes.append(int(opt.redundant.sum()))
        sets.append(set(opt.redundant.nonzero().flatten().tolist()))
        if step == 39:  # just before the second split: shrink a group not chosen yet
            tiny = next(g.id for g in oto.prunable if not opt.redundant[g.id])
            with torch.no_grad():
                for name, dim, idx in oto.groups[tiny].slices:
                    p, idx = params[name], torch.as_tensor(idx)
                    p.index_copy_(dim, idx, 1e-3 * p.index_select(dim, idx))
    third = round(target / 3)
    assert sizes[9] == 0 and sizes[10] == third and sizes[39] == third
    assert sizes[40] == round(2 * target / 3) and sizes[70] == target == sizes[-1]
    assert sets[10] < sets[40] < sets[70]
    assert tiny not in sets[39] and tiny in sets[40]
    assert int(opt.zero.sum()) == target and (opt.zero == opt.redundant).all()
    assert len(oto.zeroed_groups()) == target


class TwoFanIns(nn.Module):
    """Two hidden layers side by side that differ only in fan-in (4 and 64 inputs)."""

    def __init__(self):
        super().__init__()
        self.narrow, self.wide, self.head = nn.Linear(4, 16), nn.Linear(64, 16), nn.Linear(32, 2)

    def forward(self, x):
        hidden = torch.cat([self.narrow(x[:, :4]), self.wide(x[:, 4:])], dim=1)
        return self.head(torch.relu(hidden))


def split(model, sparsity=0.5):
    """The redundant group ids of DHSPG's split when every cosine is 0 (no gradients), so the
    split ranks by magnitude alone; and the ids of the wide layer's units."""
    oto = prune.OTO(model, (torch.randn(2, 68),))
    opt = oto.dhspg(target_group_sparsity=sparsity, start_pruning_step=0)
    opt.step()
    wide = {g.id for g in oto.prunable if any(n == "wide.weight" for n, _, _ in g.slices)}
    assert len(wide) == 16 and len(oto.prunable) == 32
    return set(opt.redundant.nonzero().flatten().tolist()), wide


def test_dhspg_split_ranks_magnitude_within_each_layer_not_across_fan_ins():
    """At initialisation the wide layer's weights are 4x smaller (1 / sqrt(fan_in)) and its
    units have 16x more elements: a root mean square per element would call nearly all of them
    redundant. The split measures each unit against its own layer, so both layers give
    redundant units, and scaling one layer by 10 changes nothing."""
    torch.manual_seed(0)
    model = TwoFanIns()
    redundant, wide = split(model)
    assert len(redundant) == 16
    assert 4 <= len(redundant & wide) <= 12
    with torch.no_grad():
        model.wide.weight.mul_(10)
        model.wide.bias.mul_(10)
    assert split(model) == (redundant, wide)


class EarlyCostlyNet(nn.Module):
    """A channel of the first two convolutions (16x16 maps) costs 16x the FLOPs of one of the
    third (4x4 maps), so a share of groups says little about the share of FLOPs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(8, 32, 3, padding=1), nn.Linear(32, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 4)
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_dhspg_flops_target_takes_the_fewest_top_groups_that_remove_that_share():
    torch.manual_seed(0)
    model, x = EarlyCostlyNet(), torch.randn(2, 3, 16, 16)
    oto = prune.OTO(model, (x,))
    full = prune.count_flops(model, (x,))
    opt = oto.dhspg(target_flops_reduction=0.4, start_pruning_step=0)
    opt.step()  # no gradients: the split ranks by magnitude alone
    chosen = opt.redundant.nonzero().flatten().tolist()
    assert 1 - oto.flops_without(chosen) / full >= 0.4

    def split_at(k):  # the same ranking cut after k groups
        by_count = prune.OTO(model, (x,)).dhspg(
            target_group_sparsity=k / len(oto.prunable), start_pruning_step=0
        )
        by_count.step()
        return by_count.redundant.nonzero().flatten().tolist()

    assert split_at(len(chosen)) == chosen
    assert 1 - oto.flops_without(split_at(len(chosen) - 1)) / full < 0.4
    assert prune.count_flops(model, (x,)) == full  # counting FLOPs left the model whole


@pytest.mark.parametrize("periods", [1, 2])
def test_dhspg_flops_target_is_reached_by_the_subnet_and_checked_up_front(periods):
    torch.manual_seed(0)
    model, x = EarlyCostlyNet(), torch.randn(64, 3, 16, 16)
    y = torch.randint(0, 4, (64,))
    oto = prune.OTO(model, (x[:2],))
    full = prune.count_flops(model, (x[:2],))
    opt = oto.dhspg(
        lr=0.05,
        target_flops_reduction=0.5,
        start_pruning_step=3,
        pruning_steps=6,
        pruning_periods=periods,
    )
    for step in range(12):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 3:  # after the first split: a share of the target per period
            removed = 1 - oto.flops_without(opt.redundant.nonzero().flatten().tolist()) / full
            assert 0.5 / periods <= removed < 0.5 / periods + 0.1
    small = oto.construct_subnet()
    assert prune.count_flops(small, (x[:2],)) <= 0.5 * full
    with pytest.raises(KompaktError, match="0.99 cannot be reached.*removes 9"):
        prune.OTO(model, (x[:2],)).dhspg(target_flops_reduction=0.99)
