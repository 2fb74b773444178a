import json
import os
import subprocess
import sys

import pytest

import kompakt
from kompakt.cli import build_parser
from tests.models import tiny_cnn


def kompakt_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "kompakt", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_help_lists_only_commands_that_work():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"inspect", "pipeline", "compress", "export", "run", "bench"}
    result = kompakt_cli("--help")
    assert result.returncode == 0
    for name in commands:
        assert name in result.stdout
        assert kompakt_cli(name, "--help").returncode == 0


def test_inspect_prints_the_table(tmp_path):
    path = kompakt.save(tiny_cnn(), tmp_path / "m")
    result = kompakt_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "stages.0.0.conv1" in result.stdout and "Conv2d" in result.stdout
    assert "1.00x vs fp32" in result.stdout


@pytest.mark.parametrize("damage", ["missing", "corrupt-json", "truncated"])
def test_bad_artifacts_give_one_line_and_write_nothing(tmp_path, damage):
    path = kompakt.save(tiny_cnn(), tmp_path / "m")
    if damage == "missing":
        path = tmp_path / "elsewhere"
    elif damage == "corrupt-json":
        (path / "kompakt.json").write_text("{not json")
    else:
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-7])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = kompakt_cli("inspect", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kompakt: error: ")
    assert str(path) in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_debug_shows_the_traceback(tmp_path):
    result = kompakt_cli("inspect", str(tmp_path / "nope"), "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "KompaktError" in result.stderr


def test_pipeline_rejects_unknown_fields_before_running(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps({"model": {"name": "fmnist_resnet"}, "stages": [{"train": {"epoch": 1}}]})
    )
    result = kompakt_cli("pipeline", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "stages[0].train: unknown field(s) epoch" in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_of_a_factory_artifact_needs_trust_code(tmp_path):
    from tests import user_models

    model, make = user_models.build("user_mlp")
    kompakt.save(model, tmp_path / "m", factory=user_models.user_mlp)
    out = tmp_path / "m.onnx"
    args = ("export", "onnx", str(tmp_path / "m"), "--out", str(out), "--input-shape", "3,12")
    refused = kompakt_cli(*args)
    assert refused.returncode == 2
    assert "tests.user_models:user_mlp" in refused.stderr and "--trust-code" in refused.stderr
    assert not out.exists()
    done = kompakt_cli(*args, "--trust-code")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "validation" in json.loads(out.with_name("m.onnx.json").read_text())


def test_export_takes_the_example_input_the_artifact_records(tmp_path):
    from kompakt.compress import quantize
    from tests import user_models

    model, make = user_models.build("user_cnn")
    config = quantize.QuantizeConfig(method="rtn", bits=4, block=9)
    quantize.quantize(model, config, [make(16)], progress=False)
    kompakt.save(model, tmp_path / "q", factory=user_models.user_cnn)
    done = kompakt_cli(
        "export", "onnx", str(tmp_path / "q"), "--out", str(tmp_path / "q.onnx"), "--trust-code"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "q.onnx.json").read_text())
    assert report["inputs"][0]["traced_shape"] == [2, 3, 8, 8]
    # a model whose artifact records no input needs --input-shape
    kompakt.save(user_models.sequential(), tmp_path / "s", factory=user_models.sequential)
    refused = kompakt_cli(
        "export", "onnx", str(tmp_path / "s"), "--out", str(tmp_path / "s.onnx"), "--trust-code"
    )
    assert refused.returncode == 2 and "--input-shape" in refused.stderr
