import importlib
import json
from pathlib import Path

import pytest
import torch

import kompakt
from kompakt import artifact
from kompakt.errors import KompaktError
from tests import user_models
from tests.models import tiny_cnn, tiny_llama


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_cnn_round_trip_is_exact(tmp_path):
    model = tiny_cnn()
    kompakt.save(model, tmp_path / "cnn")
    loaded = kompakt.load(tmp_path / "cnn")
    assert_same_state(model, loaded)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def test_tiny_llama_round_trip_keeps_tied_embeddings(tmp_path):
    model = tiny_llama(tie=True)
    kompakt.save(model, tmp_path / "llama")
    manifest = json.loads((tmp_path / "llama" / artifact.MANIFEST_FILE).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = kompakt.load(tmp_path / "llama")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert_same_state(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_untied_llama_and_half_precision_round_trip(tmp_path):
    model = tiny_llama(tie=False).half()
    kompakt.save(model, tmp_path / "llama16")
    loaded = kompakt.load(tmp_path / "llama16")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert_same_state(model, loaded)
    assert loaded.lm_head.weight.dtype == torch.float16


def test_record_survives_save_and_load(tmp_path):
    model = tiny_cnn()
    before = artifact.weights_sha256(model)
    with artifact.step(model, "finetune", {"epochs": 1}) as metrics:
        with torch.no_grad():
            model.fc.weight.add_(1.0)
        metrics["loss"] = 0.5
    kompakt.save(model, tmp_path / "a")
    loaded = kompakt.load(tmp_path / "a")
    record = artifact.record_of(loaded)
    assert record.source_sha256 == before != artifact.weights_sha256(loaded)
    assert record.steps == [
        {"method": "finetune", "config": {"epochs": 1}, "metrics": {"loss": 0.5}}
    ]
    assert record.source["kind"] == "registry" and record.source["name"] == "fmnist_resnet"


def test_save_refuses_to_overwrite_unless_asked_and_then_replaces(tmp_path):
    first, second = tiny_cnn(0), tiny_cnn(1)
    kompakt.save(first, tmp_path / "m")
    with pytest.raises(KompaktError, match="already exists"):
        kompakt.save(second, tmp_path / "m")
    assert_same_state(first, kompakt.load(tmp_path / "m"))
    kompakt.save(second, tmp_path / "m", overwrite=True)
    assert_same_state(second, kompakt.load(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_save_leaves_nothing_and_keeps_the_old_artifact(tmp_path, monkeypatch):
    old = tiny_cnn(0)
    kompakt.save(old, tmp_path / "m")

    def broken_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError, match="disk full"):
        kompakt.save(tiny_cnn(1), tmp_path / "m", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        kompakt.save(tiny_cnn(1), tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert_same_state(old, kompakt.load(tmp_path / "m"))


def test_save_refuses_to_replace_a_folder_that_is_not_an_artifact(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(KompaktError, match="not a kompakt artifact"):
        kompakt.save(tiny_cnn(), tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"


def test_unknown_module_cannot_be_saved(tmp_path):
    with pytest.raises(KompaktError, match="Sequential.*kompakt.models.build"):
        kompakt.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def saved(tmp_path):
    return kompakt.save(tiny_cnn(), tmp_path / "m")


def test_missing_directory(tmp_path):
    with pytest.raises(KompaktError, match=r"nope: no such artifact directory"):
        kompakt.load(tmp_path / "nope")


def test_corrupt_manifest(saved):
    (saved / artifact.MANIFEST_FILE).write_text('{"format": "kompakt-artifact", ')
    with pytest.raises(KompaktError, match=r"kompakt\.json: corrupt"):
        kompakt.load(saved)


def test_unknown_format_version(saved):
    manifest = json.loads((saved / artifact.MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (saved / artifact.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(KompaktError, match="format version 99 is not supported.*reads version 1"):
        kompakt.load(saved)


def test_truncated_weights(saved):
    weights = saved / artifact.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(KompaktError, match=r"model\.safetensors: truncated"):
        kompakt.load(saved)
    weights.write_bytes(data[:5])
    with pytest.raises(KompaktError, match=r"model\.safetensors: truncated"):
        kompakt.load(saved)


def test_unknown_plan_step_is_refused(saved):
    manifest = json.loads((saved / artifact.MANIFEST_FILE).read_text())
    manifest["plan"] = [{"kind": "from-the-future"}]
    (saved / artifact.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(KompaktError, match="plan\\[0\\] has kind 'from-the-future'"):
        kompakt.load(saved)


def test_tensors_that_do_not_fit_the_architecture(saved):
    manifest = json.loads((saved / artifact.MANIFEST_FILE).read_text())
    manifest["source"]["kwargs"]["widths"] = [4, 8, 16]
    (saved / artifact.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(KompaktError, match="do not match the rebuilt architecture"):
        kompakt.load(saved)


def test_no_pickle_in_the_weights_file(saved):
    assert b"\x80\x04" not in (saved / artifact.WEIGHTS_FILE).read_bytes()[:8]
    header = artifact.read_weights_header(saved / artifact.WEIGHTS_FILE)
    assert header["fc.weight"]["dtype"] == "F32"


# --- models kompakt did not build: saved with their factory -------------------------------


@pytest.mark.parametrize("name", sorted(user_models.INPUTS))
@pytest.mark.parametrize("method", ["jlcm", "gptq"])
def test_a_users_model_quantized_in_memory_saves_with_its_factory_and_loads_identically(
    tmp_path, name, method
):
    from kompakt.compress import quantize

    model, make = user_models.build(name)
    config = quantize.QuantizeConfig(method=method, bits=3, block=4, steps=5)
    quantize.quantize(model, config, [make(32), make(32)], progress=False)  # nothing registered
    assert artifact.record_of(model).steps[-1]["metrics"]["coded_layers"] >= 1
    with pytest.raises(KompaktError, match=r"factory='pkg.module:function'"):
        kompakt.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    factory = getattr(user_models, name)
    kompakt.save(model, tmp_path / "q", factory=factory)
    manifest = json.loads((tmp_path / "q" / artifact.MANIFEST_FILE).read_text())
    assert manifest["source"]["factory"] == f"tests.user_models:{name}"
    x = make(5)  # another batch size than calibration's
    for loaded in (
        kompakt.load(tmp_path / "q", trust_code=True),
        kompakt.load(tmp_path / "q", factory=factory),
    ):
        assert_same_state(model, loaded)
        assert torch.equal(loaded(x), model(x))


def test_factory_kwargs_are_recorded_and_rebuild_the_same_widths(tmp_path):
    model = user_models.user_mlp(hidden=[7, 5])
    kompakt.save(
        model, tmp_path / "m", factory="tests.user_models:user_mlp", kwargs={"hidden": [7, 5]}
    )
    loaded = kompakt.load(tmp_path / "m", trust_code=True)
    assert [layer.out_features for layer in loaded.layers] == [7, 5]
    assert_same_state(model, loaded)
    # a second save keeps the factory the record learnt
    kompakt.save(loaded, tmp_path / "again")
    assert_same_state(model, kompakt.load(tmp_path / "again", trust_code=True))


def test_loading_a_factory_artifact_without_trust_fails_and_imports_nothing(tmp_path, monkeypatch):
    import sys

    site = tmp_path / "site"
    site.mkdir()
    module = "kompakt_user_factory_under_test"
    (site / f"{module}.py").write_text(
        "from pathlib import Path\n"
        "from torch import nn\n"
        "Path(__file__).with_suffix('.imported').touch()  # a side effect of importing\n"
        "def build(width=4):\n"
        "    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))\n"
    )
    monkeypatch.syspath_prepend(str(site))
    model = importlib.import_module(module).build(6)
    kompakt.save(model, tmp_path / "a", factory=f"{module}:build", kwargs={"width": 6})
    del sys.modules[module]
    marker = site / f"{module}.imported"
    marker.unlink()
    with pytest.raises(KompaktError, match=r"trust_code=True.*--trust-code") as e:
        kompakt.load(tmp_path / "a")
    assert f"{module}:build" in str(e.value)
    assert module not in sys.modules and not marker.exists()
    loaded = kompakt.load(tmp_path / "a", trust_code=True)
    assert marker.exists()
    x = torch.randn(4, 3)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (lambda: user_models.sequential(), {}, "lambda"),
        ("tests.user_models:no_such_factory", {}, "cannot be imported"),
        ("not a path", {}, "expected 'pkg.module:function'"),
        ("tests.user_models:sequential", {"width": (3, 4)}, "JSON"),
        ("tests.user_models:sequential", {"width": torch.tensor(3)}, "JSON values"),
        ("tests.user_models:INPUTS", {}, "not callable"),
    ],
    ids=["lambda", "missing", "malformed", "tuple-kwarg", "tensor-kwarg", "not-callable"],
)
def test_a_factory_that_cannot_rebuild_the_model_is_refused_at_save_time(
    tmp_path, factory, kwargs, message
):
    with pytest.raises(KompaktError, match=message):
        kompakt.save(user_models.sequential(), tmp_path / "a", factory=factory, kwargs=kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_factory_defined_in_a_function_body_is_refused(tmp_path):
    def inner():
        return user_models.sequential()

    with pytest.raises(KompaktError, match="function body"):
        kompakt.save(user_models.sequential(), tmp_path / "a", factory=inner)


def test_the_inputs_a_model_takes_are_recorded_and_survive_save_and_load(tmp_path):
    from kompakt.compress import quantize

    # a registered architecture declares them
    assert artifact.record_of(tiny_cnn()).inputs == [
        {"name": "input", "dtype": "float32", "shape": [None, 1, 28, 28]}
    ]
    # a user's model gets them from the first step that runs it
    model, make = user_models.build("gru_classifier")
    assert artifact.record_of(model).inputs == []
    quantize.quantize(
        model, quantize.QuantizeConfig(method="rtn", bits=4, block=4), [make(8)], progress=False
    )
    expected = [{"name": "input", "dtype": "float32", "shape": [None, 5, 6]}]
    assert artifact.record_of(model).inputs == expected
    kompakt.save(model, tmp_path / "g", factory=user_models.gru_classifier)
    assert json.loads((tmp_path / "g" / artifact.MANIFEST_FILE).read_text())["inputs"] == expected
    assert artifact.record_of(kompakt.load(tmp_path / "g", trust_code=True)).inputs == expected


def test_input_specs_describe_tensors_tuples_and_keyword_inputs():
    ids = torch.zeros(2, 7, dtype=torch.int64)
    assert artifact.input_specs({"input_ids": ids, "use_cache": False}) == [
        {"name": "input_ids", "dtype": "int64", "shape": [None, 7]}
    ]
    assert [s["name"] for s in artifact.input_specs((torch.zeros(3, 4), ids))] == [
        "input_0",
        "input_1",
    ]
