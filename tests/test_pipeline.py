import pytest
import yaml

import kompakt
from kompakt import artifact
from kompakt.errors import KompaktError
from kompakt.pipeline import load_recipe, run_pipeline


def write_recipe(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_short_pipeline_trains_saves_and_records_accuracy(tmp_path):
    lines = []
    recipe = {
        "out": str(tmp_path / "out"),
        "model": {"name": "fmnist_resnet", "widths": [8, 16, 16], "blocks_per_stage": 1},
        "stages": [
            {"train": {"epochs": 1, "limit": 4000, "batch_size": 64, "lr": 0.05}},
            {"evaluate": {}},
            {"save": {"name": "m"}},
            {"quantize": {"method": "jlcm", "bits": 4, "calibration": 256, "steps": 10}},
            {"save": {"name": "q"}},
            {"export_onnx": {"name": "q", "baseline": "m", "batches": [1, 4], "repeats": 3}},
            {"export_tvm": {"name": "q", "images": 64, "batches": [1, 4], "repeats": 2}},
        ],
    }
    run_pipeline(write_recipe(tmp_path, recipe), log=lines.append)
    loaded = kompakt.load(tmp_path / "out" / "m")
    step = artifact.record_of(loaded).steps[0]
    assert step["method"] == "train" and step["config"]["limit"] == 4000
    assert step["metrics"]["test_accuracy"] > 0.6  # chance is 0.1
    quantized = artifact.record_of(kompakt.load(tmp_path / "out" / "q")).steps[-1]
    assert quantized["method"] == "jlcm" and quantized["config"]["calibration"] == 256
    assert 4 < quantized["metrics"]["bits_per_weight"] < 4.5
    (line,) = [line for line in lines if line.startswith("[quantize] 10 layers")]
    before, after = (float(a.rstrip("%")) for a in line.split("test accuracy ")[1].split(" -> "))
    assert after > before - 3  # points
    assert (tmp_path / "out" / "q.onnx").exists() and (tmp_path / "out" / "m.onnx").exists()
    tables = [line.splitlines() for line in lines if line.startswith("model ")]
    assert all(t[0].split()[:3] == ["model", "batch", "p50"] for t in tables)
    assert [len(t) for t in tables] == [5, 3]  # onnx: dense and quantized; tvm: host bundle
    assert (tmp_path / "out" / "q-host" / "params.ktns").exists()
    top1 = {
        line.split()[1]: line.split("top-1 ")[1].split(";")[0]
        for line in lines
        if line.startswith("[export_tvm]") and "top-1" in line
    }
    assert set(top1) == {"host", "aarch64-linux-gnu"} and len(set(top1.values())) == 1
    assert any(line.startswith("[evaluate] test accuracy") for line in lines)
    assert any("compression: 1.00x vs fp32" in line for line in lines)


def test_builtin_demo_recipe_is_valid():
    where, recipe = load_recipe(None)
    assert "demo.yaml" in where
    assert [next(iter(s)) for s in recipe["stages"]] == [
        "train",
        "evaluate",
        "save",
        "prune",
        "save",
        "boost",
        "save",
        "quantize",
        "save",
        "export_onnx",
        "export_tvm",
    ]


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"model": {"name": "fmnist_resnet"}, "stages": [{"fly": {}}]}, "unknown stage 'fly'"),
        ({"model": {"name": "fmnist_resnet"}, "stages": []}, "non-empty list"),
        ({"model": "fmnist_resnet", "stages": [{"evaluate": {}}]}, "'model' must be a mapping"),
        (
            {"model": {"name": "fmnist_resnet"}, "stages": [{"train": {"epochs": 0}}]},
            "epochs must be >= 1",
        ),
        ({"modle": {}, "stages": []}, "unknown field\\(s\\) modle"),
        (
            {"model": {"name": "fmnist_resnet"}, "data": "imagenet", "stages": [{"evaluate": {}}]},
            "unknown data 'imagenet'",
        ),
    ],
)
def test_bad_recipes(tmp_path, recipe, message):
    with pytest.raises(KompaktError, match=message):
        run_pipeline(write_recipe(tmp_path, recipe), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_invalid_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages: [train: {")
    with pytest.raises(KompaktError, match="r.yaml: not valid YAML"):
        run_pipeline(path)
