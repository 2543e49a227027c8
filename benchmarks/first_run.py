"""What a new user waits for: the README's first command on a fresh clone, from the venv to the results table.

Clones the repository (``--ref``, default ``HEAD``; committed files only) into a temporary
folder, and runs the first ``bash`` block of its README there verbatim (``python3 -m venv``,
``pip install`` torch and the project, ``flwr run``), timestamping every line of output.
The run gets a private ``FLWR_HOME``, model cache (``FEDPRIME_CACHE``) and local-SuperLink
ports, so that nothing this machine already holds (another checkout's SuperLink, a model
cache, Flower's config) helps or interferes; pip's own cache is left alone (its downloads
are counted in the pip phase). Every process the run starts is stopped afterwards (by the
private ``FLWR_HOME`` in their environment), and the clone is removed unless ``--keep``.

Phases reported (seconds from the start of the command): the venv, pip (torch, then the
project with its dependencies), and from the start of ``flwr run``: federation started,
first backbone loaded, training sent to the clients, first client's round-1 line, results
table, command end; the figure without pip = venv + the ``flwr run`` phase. With ``--lines
N`` it also prints the first N lines a user sees, from the command and from ``flwr run``.

``--quick`` (for the smoke test) checks the setup only: it clones, reads the command and
prints what it would run, without installing anything.

Run: ``python benchmarks/first_run.py [--out] [--lines 40]`` (about 10 minutes on 2 busy cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, load_average, machine, parser, table, write_json

#: ``(name, regular expression of the line that ends it)`` in the order they occur.
MILESTONES = (
    ("torch installed", r"^Successfully installed .*\btorch-"),
    ("project installed", r"^Successfully installed (?!.*\btorch-)(?!fedprime to )"),
    ("flwr run: first output", r"Flower configuration|Starting local SuperLink|Using SuperLink"),
    ("federation started", r"Successfully started run"),
    ("backbone loaded (server)", r"loaded backbone"),
    ("training sent to clients", r"configure_train: round 1\b"),
    ("first client round-1 line", r"client \S+ \| round 1: loss"),
    ("results table", r"\| final \(round"),
)


def readme_command(readme: Path) -> str:
    """The first ```bash block of a README (the set-up and run command)."""
    match = re.search(r"```bash\n(.+?)\n```", readme.read_text(), re.DOTALL)
    if not match:
        raise SystemExit(f"no ```bash block in {readme}")
    return match.group(1).strip()


def clean_env(work: Path) -> dict[str, str]:
    """The caller's environment without its venv, with a private Flower home, model cache and ports."""
    from fedprime_core.tools.launch import local_superlink_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "FEDPRIME_", "VIRTUAL_ENV"))}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv))
    home = work / "flwr-home"
    env.update(
        FLWR_HOME=str(home),
        FEDPRIME_CACHE=str(work / "model-cache"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        **local_superlink_ports(home),
    )
    return env


def run_timed(command: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, list[tuple[float, str]]]:
    """Run ``command`` with bash; every output line with its time in seconds since the start."""
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n"))))
            if time.monotonic() - start > timeout:
                proc.kill()
                return 124, lines
        code = proc.wait()
    lines.append((time.monotonic() - start, ""))
    return code, lines


def phases(lines: list[tuple[float, str]]) -> dict[str, float | None]:
    """Seconds at which each milestone's line appeared (``None`` if it never did)."""
    found: dict[str, float | None] = {}
    position = 0
    for name, pattern in MILESTONES:
        regex = re.compile(pattern)
        found[name] = None
        for i in range(position, len(lines)):
            if regex.search(lines[i][1]):
                found[name], position = lines[i][0], i
                break
    found["venv created"] = lines[0][0] if lines else None
    found["command end"] = lines[-1][0] if lines else None
    return found


def main() -> int:
    p = parser("first_run", __doc__.splitlines()[0])
    p.add_argument("--ref", default="HEAD", help="git ref to clone (default HEAD: committed files only)")
    p.add_argument("--lines", type=int, default=0, help="also print the first N lines a user sees")
    p.add_argument("--keep", action="store_true", help="keep the clone and its venv")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedprime-first-run-"))
    from fedprime_core.tools.launch import stop_marked

    env = clean_env(work)
    try:
        repo = work / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        subprocess.run(["git", "checkout", "-q", args.ref], cwd=repo, check=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        command = readme_command(repo / "README.md")
        print(f"fresh clone of {sha[:10]} in {repo}\n$ {command}\n", flush=True)
        if args.quick:
            write_json(args.out, {"benchmark": "first_run", "machine": machine(), "commit": sha, "command": command})
            return 0
        load_start = load_average()
        code, lines = run_timed(command, repo, env, args.timeout)
        found = phases(lines)
    finally:
        stop_marked(f"FLWR_HOME={work / 'flwr-home'}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        print("\n".join(text for _, text in lines[-40:]))
        raise SystemExit(f"the README's command failed with exit code {code}")
    flwr_start = found["project installed"]
    without_pip = None
    if flwr_start is not None and found["venv created"] is not None:
        without_pip = found["venv created"] + (found["command end"] - flwr_start)
    rows = [
        [name, f"{t:.1f}" if t is not None else "-", f"{t - flwr_start:.1f}" if t and flwr_start else "-"]
        for name, t in sorted(found.items(), key=lambda kv: kv[1] if kv[1] is not None else 1e9)
    ]
    print(table(["milestone", "s from start", "s from flwr run"], rows))
    print(f"\nwithout pip (venv + flwr run): {without_pip:.0f} s; whole command {found['command end']:.0f} s")
    print(f"load average at start {load_start}, at end {load_average()} ({os.cpu_count()} cores)")
    if args.lines:
        print(f"\nfirst {args.lines} lines of the command:\n" + "\n".join(t for _, t in lines[: args.lines]))
        start = next((i for i, (t, _) in enumerate(lines) if flwr_start is not None and t > flwr_start), 0)
        print(f"\nfirst {args.lines} lines of flwr run:\n" + "\n".join(t for _, t in lines[start : start + args.lines]))
    payload: dict[str, Any] = {
        "benchmark": "first_run",
        "machine": {**machine(), "load-average-at-start": load_start},
        "commit": sha,
        "command": command,
        "seconds": found,
        "seconds-without-pip": without_pip,
    }
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
