"""The exact versions behind the published figures: write, check and explain ``constraints.txt``.

``pyproject.toml`` keeps compatible ranges (for people who embed the project), and CI
installs what a fresh install resolves today. ``constraints.txt`` records the exact
versions of every installed distribution from the last green CI run, so that anyone can
reproduce the published figures with the same stack::

    pip install torch==2.13.0 && pip install -c constraints.txt -e '.[dev,text-encoder,image-encoder,docs]'

Commands::

    python scripts/lock.py write     # after a green CI run: record this environment
    python scripts/lock.py check     # what differs between this environment and the lock
    python scripts/lock.py check --strict   # the same, exit 1 on any difference

``check`` is what CI prints after its fresh install, so drift (a new flwr, torch,
transformers, ...) shows in the CI log the day it happens, without failing the build.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PROJECT = "fedprime"
#: Installers, not dependencies: whatever the machine's venv brings.
TOOLS = frozenset({"pip", "setuptools", "wheel"})
HEADER = """\
# Exact versions of the last green CI run (Python {python}). Reproduce the published
# figures with:  pip install torch==2.13.0 && pip install -c constraints.txt -e '.[dev,text-encoder,image-encoder,docs]'
# Regenerate after a green CI run:  python scripts/lock.py write   (see scripts/lock.py)
"""


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local label would not match other builds of the same release."""
    return version.split("+", 1)[0]


def installed() -> dict[str, str]:
    """Every installed distribution but the project itself and the installers: ``name -> version``."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != PROJECT and canonical(name) not in TOOLS:
            out[canonical(name)] = public_version(dist.version)
    return out


def read_lock(path: Path | None = None) -> dict[str, str]:
    """``name -> version`` of a constraints file of ``name==version`` lines (default: the lock)."""
    path = path or LOCK
    pins: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{lineno}: expected 'name==version', got {line!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def write(path: Path | None = None) -> None:
    path = path or LOCK
    pins = installed()
    python = ".".join(map(str, sys.version_info[:3]))
    lines = [HEADER.format(python=python)] + [f"{name}=={pins[name]}" for name in sorted(pins)]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(pins)} pins to {path}")


def drift(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    """One line per distribution whose installed version differs from the lock."""
    lines = []
    for name in sorted(set(lock) | set(env)):
        locked, have = lock.get(name), env.get(name)
        if locked != have:
            lines.append(f"{name}: locked {locked or '-'}, installed {have or '-'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write", help="record this environment in constraints.txt")
    check = sub.add_parser("check", help="compare this environment with constraints.txt")
    check.add_argument("--strict", action="store_true", help="exit 1 when anything differs")
    args = parser.parse_args(argv)
    if args.command == "write":
        write()
        return 0
    lines = drift(read_lock(), installed())
    if not lines:
        print(f"this environment matches {LOCK.name} exactly")
        return 0
    print(f"{len(lines)} distribution(s) differ from {LOCK.name} (a fresh install resolved newer releases;")
    print("run `python scripts/lock.py write` after a green CI run to record them):")
    for line in lines:
        print("  " + line)
    return 1 if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
