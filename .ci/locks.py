"""Lock files against virtual environments, for the Makefile.

    python .ci/locks.py check LOCK [NAME==VERSION ...]
        Run with a virtual environment's own python. Fails (exit 1) unless that environment
        holds exactly the packages LOCK pins, at those versions, plus kompakt itself and the
        extra pins given (packages installed with --no-deps, outside the lock). Names each
        package that differs, is missing, or is installed without being locked.

    python .ci/locks.py moved OLD NEW
        Prints each package whose pin differs between two lock files.

Only the standard library: it runs before anything is known to be installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
PROJECT = "kompakt"  # installed editable from the checkout, not locked
INSTALLER = "pip"  # the one the virtual environment came with


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str], where: str) -> dict[str, str]:
    found = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith(("#", "--")):
            continue
        match = PIN.match(line)
        if match:
            found[canonical(match[1])] = match[2]
        elif not line.startswith(" "):
            raise SystemExit(f"{where}:{number}: not a NAME==VERSION pin: {line.strip()!r}")
    return found


def read_lock(path: str) -> dict[str, str]:
    try:
        return pins(Path(path).read_text().splitlines(), path)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the lock file ({e.strerror})") from None


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def check(lock: str, extra: list[str]) -> int:
    wanted = read_lock(lock) | pins(extra, "extra pins")
    have = installed()
    problems = [
        f"{name}: {have[name]} installed, {version} locked"
        for name, version in sorted(wanted.items())
        if name in have and have[name] != version
    ]
    problems += [
        f"{name}: locked at {wanted[name]}, not installed"
        for name in sorted(wanted.keys() - have.keys())
    ]
    problems += [
        f"{name} {have[name]}: installed, not in the lock"
        for name in sorted(have.keys() - wanted.keys() - {PROJECT, INSTALLER})
    ]
    if PROJECT not in have:
        problems.append(f"{PROJECT}: not installed")
    if problems:
        print(f"{sys.prefix} does not match {lock}:", *problems, sep="\n  ", file=sys.stderr)
        print("rebuild it from the lock: rm -rf .venv && make setup", file=sys.stderr)
        return 1
    print(f"{sys.prefix} matches {lock} ({len(wanted)} pinned packages)")
    return 0


def moved(old: str, new: str) -> int:
    before, after = read_lock(old), read_lock(new)
    changes = [
        f"{name}: {before.get(name, '-')} -> {after.get(name, '-')}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]
    print(f"{new} against {old}: " + (f"{len(changes)} pins moved" if changes else "no pin moved"))
    for line in changes:
        print(f"  {line}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        return check(argv[1], argv[2:])
    if len(argv) == 3 and argv[0] == "moved":
        return moved(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
