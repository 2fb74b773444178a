import pytest
import torch

import kompakt
from kompakt import artifact
from kompakt.compress import prune
from kompakt.compress.prune.erase import ErasedBranch
from kompakt.compress.prune.oto import run
from kompakt.models import build as build_registered
from tests.compress.prune_models import build


def test_pruned_and_erased_cnn_saves_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = build_registered("fmnist_resnet", widths=[8, 16, 16], blocks_per_stage=2).eval()
    x = torch.randn(2, 1, 28, 28)
    oto = prune.OTO(model, (x,))
    oto.zero_groups(0.4, seed=3)
    oto.zero_groups(1.0, seed=0, kind="erase")
    small = oto.construct_subnet()
    kinds = [entry["kind"] for entry in artifact.record_of(small).plan]
    assert kinds == ["erase", "prune"]
    kompakt.save(small, tmp_path / "small")
    loaded = kompakt.load(tmp_path / "small")
    assert sum(isinstance(m, ErasedBranch) for m in loaded.modules()) >= 1
    for name, tensor in small.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    y = torch.randn(5, 1, 28, 28)
    assert torch.equal(small(y), loaded(y))
    torch.testing.assert_close(loaded(y), model(y), atol=1e-5, rtol=1e-5)


def test_pruned_llama_saves_and_loads(tmp_path):
    model, make = build("llama_gqa")
    oto = prune.OTO(model, make(2))
    oto.zero_groups(0.5, seed=1)
    small = oto.construct_subnet()
    assert small.model.layers[0].self_attn.k_proj.out_features < model.model.layers[
        0
    ].self_attn.k_proj.out_features or (
        small.model.layers[1].self_attn.k_proj.out_features
        < model.model.layers[1].self_attn.k_proj.out_features
    )
    kompakt.save(small, tmp_path / "llama")
    loaded = kompakt.load(tmp_path / "llama")
    inputs = make(3)
    for a, b in zip(run(small, inputs), run(loaded, inputs), strict=True):
        assert torch.equal(a, b)


def test_outputs_and_user_marked_modules_stay():
    model, make = build("vgg")
    oto = prune.OTO(model, make(2), unprunable=["0"])
    first_conv = [g for g in oto.groups if any(n == "0.weight" and d == 0 for n, d, _ in g.slices)]
    assert first_conv and not any(g.prunable for g in first_conv)
    assert all("marked unprunable" in g.reason for g in first_conv)
    last = [g for g in oto.groups if any(n == "12.weight" and d == 0 for n, d, _ in g.slices)]
    assert last and all(not g.prunable and "model output" in g.reason for g in last)


def test_an_op_without_a_rule_is_named_and_its_channels_kept():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=-1))

    oto = prune.OTO(Odd(), (torch.randn(2, 4),))
    assert any("cumsum" in m and "no pruning rule" in m for m in oto.messages)
    assert not oto.prunable


def test_h2spg_erases_the_target_share_of_blocks_and_keeps_the_network_connected():
    torch.manual_seed(0)
    model = build_registered("fmnist_resnet", widths=[4, 8, 8], blocks_per_stage=3)
    x, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    oto = prune.OTO(model, (x[:2],))
    opt = oto.h2spg(lr=0.05, target_group_sparsity=0.5, start_pruning_step=5, pruning_steps=20)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.group_sparsity == pytest.approx(opt.target / len(oto.erasable))
    assert opt.target >= 0.45 * len(oto.erasable)
    zeroed = [g for g in oto.zeroed_groups() if oto.groups[g].kind == "erase"]
    assert oto.connected(zeroed) == zeroed
    small = oto.construct_subnet()
    assert sum(isinstance(m, ErasedBranch) for m in small.modules()) == len(zeroed)
    torch.testing.assert_close(small(x), model.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", ["--sparsity", "--flops-reduction"])
def test_cli_prunes_a_saved_classifier(tmp_path, option):
    import subprocess
    import sys

    torch.manual_seed(0)
    kompakt.save(
        build_registered("fmnist_resnet", widths=[8, 16, 16], blocks_per_stage=1),
        tmp_path / "dense",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kompakt",
            "compress",
            "prune",
            str(tmp_path / "dense"),
            "--out",
            str(tmp_path / "small"),
            option,
            "0.5",
            "--epochs",
            "1",
            "--start-epochs",
            "0",
            "--pruning-epochs",
            "1",
            "--limit",
            "512",
            *(["--pruning-periods", "2"] if option == "--flops-reduction" else []),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "prune: FLOPs" in result.stdout
    small = kompakt.load(tmp_path / "small")
    assert prune.count_params(small) < prune.count_params(kompakt.load(tmp_path / "dense"))
    step = artifact.record_of(small).steps[-1]
    assert step["method"] == "prune" and step["config"]["method"] == "dhspg"
    metrics = step["metrics"]
    if option == "--sparsity":
        assert metrics["group_sparsity"] == pytest.approx(0.5, abs=0.01)
    else:  # fewer groups than half remove half the FLOPs: the early channels cost the most
        assert metrics["flops_after"] <= 0.5 * metrics["flops_before"]
        assert step["config"]["target_flops_reduction"] == 0.5
        assert step["config"]["pruning_periods"] == 2
        assert metrics["group_sparsity"] < 0.5
