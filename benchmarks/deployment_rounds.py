"""Deployment round time against the slowest client's own training + evaluation, with and without resident sites.

A loopback deployment started the way the README starts one: ``scripts/start_superlink.sh``,
one ``scripts/start_supernode.sh --data-dir <site>`` per site folder (``tests/sites.py``: each
site its own label subset and real missing modalities), then ``flwr run . <connection>`` with
``--rounds`` rounds of local training and client-side evaluation. The server holds no data
(``server-eval=false``, ``classes`` in the run config): a round is the sites' work plus Flower.

* **resident** (``after``): ``start_supernode.sh`` as documented: each site's resident worker
  (``fedprime_core/site_worker.py``) loads the backbone and the site's data once per run (for the
  identity query before round 1) and serves every message of the run;
* **per message** (``before``): ``start_supernode.sh --no-worker``: every message's fresh
  ClientApp process imports torch, loads the backbone and reads the site's data itself (what
  every deployment did before the worker).

Per round: the round's wall time (``round-seconds`` of metrics.json: from sending the train
messages to the last reply of the round), the slowest client's own train + evaluation time
(``train-seconds`` from its forwarded round line, ``eval-seconds`` of the evaluations the
round carried: the previous round's, which travels with this round's training, and in the
last round its own),
their ratio (goal: <= 1.2), and per site the backbone loads in the run (``loaded backbone``
lines in its SuperNode's log, where its worker's or its ClientApp processes' lines go).

Models: ``tiny-vilt``, and ``ViLT-B/32`` shapes: ``ViltModel(ViltConfig())`` with random
weights (the architecture of ``dandelin/vilt-b32-mlm``, 384-px images; no download), saved to
a local folder with tiny-vilt's tokenizer. Every process started is stopped afterwards (by the
private ``FLWR_HOME`` in their environment).

Run: ``python benchmarks/deployment_rounds.py [--quick] [--out] [--models tiny-vilt vilt-b32]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import ROOT, machine, parser, table, write_json

MODES = {"per-message": ["--no-worker"], "resident": []}


def vilt_b32_random(folder: Path) -> Path:
    """A local ViLT-B/32 folder: the real architecture, random weights, tiny-vilt's tokenizer, 384-px processor."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones import resolve_source
    from fedprime_core.backbones.vilt import make_image_processor

    torch.manual_seed(0)
    ViltModel(ViltConfig()).save_pretrained(folder)
    tiny = Path(resolve_source("vilt", "tiny-vilt"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / name, folder / name)
    make_image_processor().save_pretrained(folder)
    return folder


class Deployment:
    """A SuperLink and one SuperNode per site on 127.0.0.1, started with scripts/ (stopped by ``close``)."""

    def __init__(self, work: Path, sites: dict[str, Path], node_args: list[str]) -> None:
        from tests.processes import flower_env, free_port, run_checked

        self.work = work
        self.home = work / "flwr-home"
        self.home.mkdir(parents=True)
        self.logs = work / "logs"
        self.logs.mkdir()
        self.env = flower_env(self.home, FEDPRIME_CACHE=str(work.parent / "model-cache"))
        # The sites' address (the Fleet gate) and the operator's (the Control API on loopback), as documented.
        port, control = free_port(), free_port()
        superlink = ["--port", str(port), "--host", "127.0.0.1", "--control-port", str(control)]
        self._spawn("superlink", [str(ROOT / "scripts/start_superlink.sh"), *superlink])
        add = [str(ROOT / "scripts/add_connection.sh"), "bench", f"127.0.0.1:{control}"]
        run_checked(add, self.env, timeout=60)
        deadline = time.monotonic() + 120
        while subprocess.run(["flwr", "ls", "bench"], cwd=ROOT, env=self.env, capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not come up:\n" + (self.logs / "superlink.log").read_text())
            time.sleep(1)
        for name, folder in sites.items():
            cmd = [str(ROOT / "scripts/start_supernode.sh"), "--superlink", f"127.0.0.1:{port}"]
            cmd += ["--data-dir", str(folder), "--client-id", name, "--device", "cpu", "--port", str(free_port())]
            self._spawn(f"supernode-{name}", [*cmd, *node_args, "--", "--max-retries", "3", "--max-wait-time", "30"])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def run(self, overrides: str, timeout: float) -> str:
        cmd = ["flwr", "run", ".", "bench", "--stream", "--run-config", overrides]
        out = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        return out.stdout + out.stderr

    def close(self) -> None:
        from tests.processes import stop_marked

        stop_marked(f"FLWR_HOME={self.home}")


def measure(model: str, mode: str, args, work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    sites = {name: site["dir"] for name, site in list(plan["sites"].items())[: args.sites]}
    results = work / "results"
    overrides = (
        f'model="{model}" dataset="food101" data-dir="" classes="{",".join(plan["classes"])}" '
        f'missing-setting="none" server-eval=false num-server-rounds={args.rounds} results-dir="{results}" '
        f'run-name="bench" min-available-nodes={len(sites)} min-train-nodes={len(sites)} fraction-evaluate=1.0 '
        f"tau=8 kappa=2 batch-size={args.batch_size} text-max-length=24 max-train-samples={args.train_rows} "
        f"node-wait=600.0 image-size={args.image_size}"
    )
    fed = Deployment(work, sites, MODES[mode])
    started = time.perf_counter()
    try:
        log = fed.run(overrides, args.timeout)
    finally:
        fed.close()
    wall = time.perf_counter() - started
    metrics = results / "bench" / "metrics.json"
    if "FedPrime finished" not in log or not metrics.is_file():
        raise RuntimeError(f"the {mode} run of {model} failed; last output:\n{log[-4000:]}")
    (work / "flwr-run.log").write_text(log)
    trained: dict[tuple[int, str], float] = {}
    for client, rnd, seconds in re.findall(r"client (\S+) \| round (\d+): loss \S+ on \d+ samples in ([\d.]+)s", log):
        trained[(int(rnd), client)] = float(seconds)
    records = json.loads(metrics.read_text())
    # A round's client-side evaluation travels with the next round's training (client-eval-in-round):
    # a round's own work is its training plus the evaluations its messages carried.
    evaluated: dict[int, dict[str, float]] = {}
    for record in records:
        where = int(record.get("client-eval-in-round", record["round"]))
        carried = evaluated.setdefault(where, {})
        for c, m in record.get("client-eval-per-client", {}).items():
            carried[c] = carried.get(c, 0.0) + float(m["eval-seconds"])
    rounds = []
    for record in records:
        rnd = record["round"]
        if rnd < 1:
            continue
        clients = {c for (r, c) in trained if r == rnd} | set(evaluated.get(rnd, {}))
        own = {c: trained.get((rnd, c), float("nan")) + evaluated.get(rnd, {}).get(c, 0.0) for c in sorted(clients)}
        slowest = max(own.values()) if own else float("nan")
        rounds.append(
            {
                "round": rnd,
                "round-seconds": record["round-seconds"],
                "slowest-client-train-eval-seconds": slowest,
                "ratio": record["round-seconds"] / slowest if slowest else float("nan"),
                "client-train-eval-seconds": own,
            }
        )
    loads = {name: (fed.logs / f"supernode-{name}.log").read_text().count("loaded backbone") for name in sites}
    return {"rounds": rounds, "backbone-loads-per-site": loads, "flwr-run-wall-seconds": wall}


def main() -> None:
    p = parser("deployment_rounds", __doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-vilt", "vilt-b32"], choices=["tiny-vilt", "vilt-b32"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--sites", type=int, default=3, help="site folders of tests/sites.py (at most 3)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-rows", type=int, default=0, help="max-train-samples per site (0: all 40)")
    p.add_argument("--b32-train-rows", type=int, default=16, help="max-train-samples per site for ViLT-B/32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=0, help="0: each model's own (ViLT-B/32: 384 px)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for one flwr run")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, results)")
    p.add_argument("--b32-folder", type=Path, default=None, help="where to make (or find) the random ViLT-B/32")
    args = p.parse_args()
    if args.quick:
        args.models, args.rounds, args.sites = ["tiny-vilt"], 2, 2
    from tests.sites import make_sites

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load-average-at-start']}")
    work = Path(tempfile.mkdtemp(prefix="fedprime-deploy-bench-"))
    out: dict[str, Any] = {
        "benchmark": "deployment_rounds",
        "machine": info,
        "settings": vars(args).copy(),
        "results": {},
    }
    try:
        plan = make_sites(work / "data")
        rows = []
        for model in args.models:
            name = model
            if model == "vilt-b32":
                name = str(vilt_b32_random(args.b32_folder or work / "vilt-b32-random"))
            run_args = argparse.Namespace(**vars(args))
            run_args.train_rows = args.b32_train_rows if model == "vilt-b32" else args.train_rows
            for mode in args.modes:
                print(f"\n{model}, {mode}: {args.sites} sites, {args.rounds} rounds ...", flush=True)
                got = measure(name, mode, run_args, work / f"{model}-{mode}", plan)
                out["results"][f"{model}/{mode}"] = got
                for r in got["rounds"]:
                    print(
                        f"  round {r['round']}: {r['round-seconds']:.1f} s; slowest client train+eval "
                        f"{r['slowest-client-train-eval-seconds']:.1f} s; ratio {r['ratio']:.2f}",
                        flush=True,
                    )
                print(f"  backbone loads per site: {got['backbone-loads-per-site']}", flush=True)
                later = [r for r in got["rounds"] if r["round"] >= 2] or got["rounds"]
                rows.append(
                    [
                        model,
                        mode,
                        got["rounds"][0]["round-seconds"],
                        statistics.median(r["round-seconds"] for r in later),
                        statistics.median(r["slowest-client-train-eval-seconds"] for r in later),
                        statistics.median(r["ratio"] for r in got["rounds"]),
                        "/".join(str(n) for n in got["backbone-loads-per-site"].values()),
                    ]
                )
        headers = [
            "model",
            "sites",
            "round 1 s",
            "later rounds s (median)",
            "slowest client train+eval s",
            "ratio (median, all rounds)",
            "backbone loads per site",
        ]
        print("\n" + table(headers, rows))
        out["table"] = {"headers": headers, "rows": rows}
    finally:
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
