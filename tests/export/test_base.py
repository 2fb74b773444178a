"""The exporters' shared pieces: the registries, the preamble, the atomic write."""

import pytest

import kompakt
from kompakt import export, runtime
from kompakt.errors import KompaktError
from kompakt.export.base import atomic_output, prepare
from kompakt.registry import Registry
from tests import user_models


def test_a_registry_refuses_a_name_twice_and_names_the_known_ones():
    things = Registry("widget")
    things.register("b")(1)
    things.add("a", 2)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        things.add("a", 3)
    with pytest.raises(KompaktError, match="unknown widget 'c'; known: a, b"):
        things.get("c")
    assert things.get("a") == 2 and "b" in things and [n for n, _ in things.items()] == ["b", "a"]


def test_every_export_target_has_a_runtime_and_dispatch_goes_through_them(tmp_path):
    assert export.EXPORTERS.names() == runtime.RUNTIMES.names() == ["onnx", "tvm"]
    assert export.EXPORTERS.get("onnx") is export.onnx
    with pytest.raises(KompaktError, match=r"x\.txt: not an exported model.*\.onnx.*TVM bundle"):
        runtime.load(tmp_path / "x.txt")


def test_prepare_loads_artifacts_with_trust_code_and_refuses_an_existing_out(tmp_path):
    model, make = user_models.build("sequential")
    kompakt.save(model, tmp_path / "a", factory=user_models.sequential)
    with pytest.raises(KompaktError, match="trust_code=True"):
        prepare(tmp_path / "a", make(1), tmp_path / "m.onnx", dynamic=True, overwrite=False)
    job = prepare(
        tmp_path / "a", make(1), tmp_path / "m.onnx", dynamic=True, overwrite=False, trust_code=True
    )
    assert job.source == str(tmp_path / "a") and job.label == "Sequential"
    assert job.inputs[0].shape[0] == 2  # a batch of 1 is traced as 2, or the batch axis is fixed
    assert not job.model.training and not job.language_model
    (tmp_path / "m.onnx").write_text("keep")
    with pytest.raises(KompaktError, match="already exists"):
        prepare(model, make(2), tmp_path / "m.onnx", dynamic=True, overwrite=False)


def test_atomic_output_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_output(target) as staged:
        staged.mkdir()
        (staged / "new").write_text("new")
        assert not (target / "new").exists()  # not visible before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    deep = tmp_path / "made" / "for" / "it.onnx"
    with pytest.raises(RuntimeError), atomic_output(deep) as staged:
        staged.write_text("half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_an_export_that_fails_validation_leaves_no_folder_behind(tmp_path):
    model, make = user_models.build("user_mlp")
    with pytest.raises(KompaktError, match="above the tolerance"):
        export.onnx(model, make(2), tmp_path / "new" / "m.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
