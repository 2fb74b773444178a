"""The lock check `make test` runs first (`.ci/locks.py`), against this test's own environment."""

import importlib.util
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("locks", ROOT / ".ci" / "locks.py")
locks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(locks)


def _write_lock(path: Path, pins: dict[str, str]) -> str:
    lines = []
    for name, version in sorted(pins.items()):
        lines += [f"{name}=={version} \\", "    --hash=sha256:00", "    # via kompakt"]
    path.write_text("# made by a test\n" + "\n".join(lines) + "\n")
    return str(path)


def _environment() -> dict[str, str]:
    have = locks.installed()
    return {n: v for n, v in have.items() if n not in (locks.PROJECT, locks.INSTALLER)}


def test_an_environment_matching_its_lock_passes(tmp_path):
    assert locks.check(_write_lock(tmp_path / "a.lock", _environment()), []) == 0


def test_a_moved_missing_or_unlocked_package_is_named(tmp_path, capsys):
    pins = _environment()
    moved, unlocked = "torch", "numpy"
    pins[moved] = "0.0.1"
    pins.pop(unlocked)
    pins["no-such-package"] = "1.0"
    assert locks.check(_write_lock(tmp_path / "a.lock", pins), []) == 1
    err = capsys.readouterr().err
    assert f"torch: {metadata.version('torch')} installed, 0.0.1 locked" in err
    assert f"numpy {metadata.version('numpy')}: installed, not in the lock" in err
    assert "no-such-package: locked at 1.0, not installed" in err


def test_extra_pins_count_as_locked(tmp_path):
    pins = _environment()
    torch_version = pins.pop("torch")
    lock = _write_lock(tmp_path / "a.lock", pins)
    assert locks.check(lock, []) == 1
    assert locks.check(lock, [f"torch=={torch_version}"]) == 0


def test_moved_lists_the_pins_that_differ(tmp_path, capsys):
    old = _write_lock(tmp_path / "old.lock", {"a": "1", "b": "2", "c": "3"})
    new = _write_lock(tmp_path / "new.lock", {"a": "1", "b": "2.1", "d": "4"})
    locks.moved(old, new)
    out = capsys.readouterr().out
    assert "3 pins moved" in out
    assert "b: 2 -> 2.1" in out and "c: 3 -> -" in out and "d: - -> 4" in out
    assert "a:" not in out


def test_a_line_that_is_not_a_pin_is_refused(tmp_path):
    bad = tmp_path / "bad.lock"
    bad.write_text("torch>=2.13\n")
    with pytest.raises(SystemExit, match=r"bad.lock:1: not a NAME==VERSION pin"):
        locks.read_lock(str(bad))
