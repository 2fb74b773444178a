"""Guards on the package's structure: lazy heavy imports, import direction, no unpickling."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kompakt"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_import_kompakt_does_not_import_export_backends():
    code = (
        "import sys, kompakt, kompakt.cli, kompakt.models, kompakt.data, kompakt.pipeline\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'tvm', 'onnxscript'))\n"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# each package, and what none of its modules may import, even inside a function
FORBIDDEN = {
    "runtime": ("kompakt.compress", "kompakt.export", "torch", "transformers"),
    "compress": ("kompakt.export", "kompakt.runtime"),
}


def forbidden_imports(package: Path, prefixes: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(package.parent)} imports {m}"
        for path in sorted(package.rglob("*.py"))
        for m in sorted(imported_modules(path))
        if any(m == p or m.startswith(p + ".") for p in prefixes)
    ]


def test_import_direction():
    found = [f for name, bad in FORBIDDEN.items() for f in forbidden_imports(PACKAGE / name, bad)]
    assert found == []


def test_the_import_direction_guard_catches_a_lazy_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    from torch import nn\n    import os\n")
    assert forbidden_imports(tmp_path / "pkg", ("torch",)) == ["pkg/m.py imports torch"]


def unsafe_loading(path: Path) -> list[str]:
    """Places in ``path`` that could unpickle: pickle imports, torch.load without
    weights_only=True, trust_remote_code=True."""
    found = [f"{path}: imports {m}" for m in {"pickle", "cPickle", "dill"} & imported_modules(path)]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "load"
            and getattr(node.func.value, "id", None) == "torch"
        ):
            flag = [k for k in node.keywords if k.arg == "weights_only"]
            if not (flag and getattr(flag[0].value, "value", None) is True):
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            if getattr(node.value, "value", None) is True:
                found.append(f"{path}:{node.lineno}: trust_remote_code=True")
    return found


def test_no_pickle_or_unsafe_torch_load_in_the_package():
    assert [f for p in PACKAGE.rglob("*.py") for f in unsafe_loading(p)] == []


def test_the_unpickling_guard_catches_each_case(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\ntorch.load('a')\ntorch.load('b', weights_only=False)\n"
        "torch.load('c', weights_only=True)\nf(trust_remote_code=True)\n"
    )
    found = unsafe_loading(bad)
    assert len(found) == 4
    assert any("imports pickle" in f for f in found)
    assert sum("torch.load" in f for f in found) == 2
