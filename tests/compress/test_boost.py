import json
import math

import pytest
import torch
import yaml

import kompakt
from kompakt import artifact
from kompakt.compress import boost
from kompakt.errors import KompaktError
from kompakt.pipeline import run_pipeline
from tests import user_models
from tests.models import tiny_cnn
from tests.test_cli import kompakt_cli

FAST = {"max_iter": 30}  # L-BFGS iterations per step: enough for these small problems


def blobs(n=300, classes=3, dim=4, seed=0, spread=0.6):
    """Gaussian blobs around random centres; class k has weight proportional to k + 1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    weights = torch.arange(1, classes + 1, dtype=torch.float)
    y = torch.multinomial(weights, n, replacement=True, generator=g)
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    return x * 3 + 5, y  # off-centre, unscaled: exercises the folded standardization


def wave(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g) * 4 - 2
    return x, torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2


def fitted(task, **overrides):
    if task == "regression":
        x, y = wave(300, 0)
    else:
        x, y = blobs(classes=2 if task == "binary" else 3)
    config = {"units_per_step": 3, "steps": 6, **FAST, **overrides}
    gbnn = boost.GBNN(task="regression" if task == "regression" else "classification", **config)
    return gbnn.fit(x, y, progress=False), x, y


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_merged_head_equals_the_staged_sum(task):
    gbnn, x, _ = fitted(task)
    head = gbnn.to_module()
    assert isinstance(head, boost.BoostedHead)
    assert isinstance(head.hidden, torch.nn.Linear) and isinstance(head.out, torch.nn.Linear)
    assert head.units == gbnn.units == 18
    staged = list(gbnn.staged_predict(x))
    assert len(staged) == 6
    with torch.no_grad():
        merged = head(x)
    torch.testing.assert_close(merged, staged[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(staged[0], staged[-1], atol=1e-2)  # the steps do contribute


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_truncating_to_t_steps_equals_stopping_boosting_after_t_steps(task):
    gbnn, x, _ = fitted(task)
    staged = list(gbnn.staged_predict(x))
    head = gbnn.to_module()
    for t in (1, 2, 5):
        short, _, _ = fitted(task, steps=t)  # the same seed: boosting stopped after t steps
        with torch.no_grad():
            expected = short.to_module()(x)
            assert torch.equal(gbnn.truncate(3 * t).to_module()(x), expected)
            torch.testing.assert_close(head.truncate(3 * t)(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(staged[t - 1], expected, atol=1e-5, rtol=1e-5)
        assert gbnn.truncate(3 * t).units == head.truncate(3 * t).units == 3 * t


@pytest.mark.parametrize("units", [4, 0, 21, 3.0])
def test_truncate_refuses_anything_but_whole_steps(units):
    gbnn, _, _ = fitted("multiclass")
    with pytest.raises(KompaktError, match="multiple of units_per_step=3 between 3 and 18"):
        gbnn.truncate(units)
    with pytest.raises(KompaktError, match="multiple of units_per_step=3"):
        gbnn.to_module().truncate(units)


def test_regression_learns_a_known_function():
    x, y = wave(600, 0)
    x_test, y_test = wave(500, 1)
    gbnn = boost.GBNN(task="regression", units_per_step=2, steps=20, **FAST)
    gbnn.fit(x, y, progress=False)
    mse = (gbnn.predict(x_test) - y_test).square().mean().item()
    assert gbnn.predict(x_test).shape == y_test.shape
    assert mse < 0.05, f"test MSE {mse:.4f} (target variance {y_test.var():.3f})"
    losses = gbnn.history["train_loss"]
    assert losses[-1] < losses[0] / 5


def test_multi_output_regression_keeps_the_output_shape():
    x, y = wave(300, 0)
    targets = torch.stack([y, -2 * y + 1], 1)
    gbnn = boost.GBNN(task="regression", units_per_step=2, steps=20, **FAST).fit(
        x, targets, progress=False
    )
    assert gbnn.predict(x).shape == (300, 2)
    assert (gbnn.predict(x) - targets).square().mean() < 0.1 * targets.var(0).mean()


@pytest.mark.parametrize(
    "task, expected",
    [
        ("regression", lambda y: y.mean().reshape(1)),
        ("binary", lambda y: torch.stack([1 - y.float().mean(), y.float().mean()])),
        ("multiclass", lambda y: torch.bincount(y).float() / len(y)),
    ],
)
def test_boosting_starts_from_the_constant_minimising_the_loss(task, expected):
    # with a vanishing shrinkage the steps add nothing: what is left is the starting constant
    gbnn, x, y = fitted(task, eta=1e-9, steps=1)
    if task == "regression":
        start = gbnn.predict(x).mean(0).reshape(1)
    else:
        start = gbnn.predict_proba(x).mean(0)
    torch.testing.assert_close(start, expected(y), atol=1e-5, rtol=1e-5)


def test_multiclass_probabilities_sum_to_one():
    x, y = blobs(n=400, classes=4, seed=3)
    gbnn = boost.GBNN(units_per_step=2, steps=5, **FAST).fit(x[:300], y[:300], progress=False)
    proba = gbnn.predict_proba(x[300:])
    assert proba.shape == (100, 4) and (proba >= 0).all()
    torch.testing.assert_close(proba.sum(1), torch.ones(100))
    assert torch.equal(proba.argmax(1), gbnn.predict(x[300:]))
    assert (gbnn.predict(x[300:]) == y[300:]).float().mean() > 0.9


def test_binary_classification_on_breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:400], order[400:]
    gbnn = boost.GBNN(units_per_step=2, steps=5, **FAST).fit(x[train], y[train], progress=False)
    scores = gbnn.decision_function(x[test])
    assert scores.shape == (len(test), 2) and torch.equal(scores[:, 0], torch.zeros(len(test)))
    torch.testing.assert_close(gbnn.predict_proba(x[test]).sum(1), torch.ones(len(test)))
    accuracy = (gbnn.predict(x[test]) == y[test]).float().mean().item()
    assert accuracy > 0.93, accuracy


def test_early_stopping_keeps_the_best_prefix():
    x, y = blobs(n=600, classes=3, seed=1, spread=2.5)  # overlapping classes: overfits soon
    gbnn = boost.GBNN(units_per_step=4, steps=40, eta=1.0, patience=3, **FAST)
    gbnn.fit(x[:300], y[:300], validation=(x[300:], y[300:]), progress=False)
    val = gbnn.history["val_loss"]
    assert len(val) < 40, "no early stop"
    best = min(range(len(val)), key=val.__getitem__) + 1
    assert gbnn.units == 4 * best and len(val) == best + 3


def test_validation_fraction_holds_out_rows_for_early_stopping():
    x, y = blobs(n=600, classes=3, seed=1, spread=2.5)
    gbnn = boost.GBNN(
        units_per_step=4, steps=40, eta=1.0, patience=3, validation_fraction=0.3, **FAST
    )
    gbnn.fit(x, y, progress=False)
    assert 0 < len(gbnn.history["val_loss"]) < 40


@pytest.mark.parametrize(
    "features, labels, message",
    [
        (torch.randn(10, 3), torch.rand(10), "integer class indices, got torch.float32"),
        (torch.randn(10, 3), torch.ones(10, dtype=torch.bool), "integer class indices"),
        (torch.randn(10), torch.zeros(10, dtype=torch.long), r"\[N, d\] matrix, got shape \(10,\)"),
        (torch.randn(10, 3), torch.zeros(9, dtype=torch.long), "does not match 10 feature rows"),
        (torch.randn(10, 3), torch.zeros(10, 2, dtype=torch.long), "one-dimensional"),
        (torch.randn(10, 3), torch.zeros(10, dtype=torch.long), "at least two classes, got 1"),
        (torch.randn(10, 3), torch.arange(10) - 1, "labels must be >= 0"),
        (torch.randn(10, 3), ["a", "b"] * 5, "cannot be read as a tensor"),
        (torch.randint(0, 5, (10, 3)), torch.arange(10) % 2, "floating point, got torch.int64"),
        (torch.full((10, 3), math.nan), torch.arange(10) % 2, "NaN or inf"),
    ],
)
def test_bad_inputs_are_refused_clearly(features, labels, message):
    with pytest.raises(KompaktError, match=message):
        boost.GBNN(steps=1).fit(features, labels, progress=False)


def test_bad_use_is_refused_clearly():
    with pytest.raises(KompaktError, match="not fitted"):
        boost.GBNN().predict(torch.randn(3, 4))
    with pytest.raises(KompaktError, match="labels must be in \\[0, 2\\)"):
        boost.GBNN(steps=1, num_classes=2).fit(torch.randn(6, 2), torch.arange(6) % 3)
    gbnn, _, _ = fitted("multiclass")
    with pytest.raises(KompaktError, match="features have 5 columns, the GBNN was fitted on 4"):
        gbnn.predict(torch.randn(3, 5))
    regression, _, _ = fitted("regression")
    with pytest.raises(KompaktError, match="does regression; use predict"):
        regression.predict_proba(torch.randn(3, 3))
    with pytest.raises(KompaktError, match="validation must be a \\(features, y\\) tuple"):
        boost.GBNN(steps=1).fit(*blobs(), validation=[torch.randn(3, 4)], progress=False)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"units_per_step": 0}, "units_per_step must be >= 1"),
        ({"task": "ranking"}, "task must be one of classification, regression"),
        ({"activation": "gelu"}, "activation must be one of sigmoid, tanh, relu"),
        ({"subsample": 0}, r"subsample must be in \(0, 1\]"),
        ({"task": "regression", "num_classes": 3}, "num_classes must be None"),
        ({"stepz": 3}, "unknown field\\(s\\) stepz"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(KompaktError, match=message):
        boost.GBNN(**fields)


def cnn_with_boosted_head():
    model = tiny_cnn()
    images = torch.randn(120, 1, 28, 28)
    labels = torch.arange(120) % 10
    features = boost.head_features(model, "fc", images, batch_size=50, progress=False)
    gbnn = boost.GBNN(units_per_step=2, steps=3, **FAST).fit(features, labels, progress=False)
    boost.replace_head(model, "fc", gbnn.to_module())
    return model, gbnn, images


def test_head_features_are_the_input_of_the_head():
    model = tiny_cnn()
    x = torch.randn(7, 1, 28, 28)
    features = boost.head_features(model, "fc", x, batch_size=3, progress=False)
    with torch.no_grad():
        expected = torch.flatten(model.pool(model.stages(model.stem(x))), 1)
    torch.testing.assert_close(features, expected)


def test_boosted_head_in_a_backbone_computes_the_gbnn():
    model, gbnn, images = cnn_with_boosted_head()
    features = boost.head_features(model, "fc", images, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(images), gbnn.decision_function(features))
    assert artifact.record_of(model).plan == [
        {
            "kind": "boost_head",
            "module": "fc",
            "in_features": 8,
            "units": 6,
            "out_features": 10,
            "units_per_step": 2,
            "activation": "sigmoid",
        }
    ]


def test_save_load_round_trip_of_a_boosted_backbone_is_exact(tmp_path):
    model, _, images = cnn_with_boosted_head()
    kompakt.save(model, tmp_path / "boosted")
    loaded = kompakt.load(tmp_path / "boosted")
    assert isinstance(loaded.fc, boost.BoostedHead)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        loaded.fc = loaded.fc.truncate(4)  # switching units off works on the loaded layer
        model.fc = model.fc.truncate(4)
        assert torch.equal(loaded(images), model(images))


@pytest.mark.parametrize(
    "name, head, classes",
    [("user_mlp", "head", 4), ("gru_classifier", "head", 3), ("sequential", "2", 4)],
)
def test_a_users_classifier_gets_a_boosted_head_and_saves_with_its_factory(
    tmp_path, name, head, classes
):
    model, make = user_models.build(name)
    labels = torch.randint(0, classes, (240,), generator=torch.Generator().manual_seed(0))
    inputs, test_inputs = make(240), make(60)
    config = boost.BoostHeadConfig(head=head, units_per_step=4, steps=3)
    boost.boost_classifier_head(
        model, (inputs, labels), (test_inputs, labels[:60]), config, progress=False
    )
    assert isinstance(model.get_submodule(head), boost.BoostedHead)
    features = boost.head_features(model, head, test_inputs, progress=False)
    with torch.no_grad():
        assert torch.equal(model(test_inputs), model.get_submodule(head)(features))
    kompakt.save(model, tmp_path / "b", factory=getattr(user_models, name))
    loaded = kompakt.load(tmp_path / "b", trust_code=True)
    x = make(7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_replace_head_refuses_a_head_of_other_widths():
    model = tiny_cnn()
    other = boost.BoostedHead(in_features=8, units=4, out_features=3, units_per_step=2)
    with pytest.raises(
        KompaktError, match="fc: Linear maps 8 -> 10 features, the boosted head maps 8 -> 3"
    ):
        boost.replace_head(model, "fc", other)
    with pytest.raises(
        KompaktError, match="has no module 'head'.*top-level modules: stem, stages, pool, fc"
    ):
        boost.replace_head(model, "head", other)
    assert artifact.record_of(model).plan == []


def test_a_corrupt_plan_entry_is_refused(tmp_path):
    model, _, _ = cnn_with_boosted_head()
    path = kompakt.save(model, tmp_path / "m")
    manifest = json.loads((path / "kompakt.json").read_text())
    manifest["plan"][0]["module"] = "classifier"
    (path / "kompakt.json").write_text(json.dumps(manifest))
    with pytest.raises(KompaktError, match="no module 'classifier'"):
        kompakt.load(path)


@pytest.mark.slow
def test_pipeline_boost_stage_reports_and_saves(tmp_path):
    recipe = {
        "out": str(tmp_path / "out"),
        "model": {"name": "fmnist_resnet", "widths": [4, 8, 8], "blocks_per_stage": 1},
        "stages": [
            {"train": {"epochs": 1, "limit": 2000, "batch_size": 64, "lr": 0.05}},
            {"boost": {"units_per_step": 4, "steps": 4, "limit": 3000, "max_iter": 20}},
            {"save": {"name": "boosted"}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    lines = []
    run_pipeline(path, log=lines.append)
    line = next(line for line in lines if line.startswith("[boost] test accuracy"))
    assert "with 16 boosted units (4 steps)" in line and "with the first 8 (half)" in line
    loaded = kompakt.load(tmp_path / "out" / "boosted")
    step = artifact.record_of(loaded).steps[-1]
    assert step["method"] == "boost" and step["config"]["limit"] == 3000
    assert step["metrics"]["test_accuracy"] > 0.5  # chance is 0.1
    assert isinstance(loaded.fc, boost.BoostedHead) and loaded.fc.units == 16


@pytest.mark.slow
def test_cli_compress_boost_writes_a_loadable_artifact(tmp_path):
    source = kompakt.save(tiny_cnn(), tmp_path / "cnn")
    args = ["--steps", "2", "--units-per-step", "3", "--limit", "1000"]
    result = kompakt_cli("compress", "boost", str(source), "--out", str(tmp_path / "b"), *args)
    assert result.returncode == 0, result.stderr
    assert "with 6 boosted units (2 steps)" in result.stdout
    assert "with the first 3 (half)" in result.stdout
    assert isinstance(kompakt.load(tmp_path / "b").fc, boost.BoostedHead)
    again = kompakt_cli("compress", "boost", str(source), "--out", str(tmp_path / "b"))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
