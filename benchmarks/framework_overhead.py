"""Wall time of a Flower simulation round vs calling the same training and aggregation directly.

The federation: method ``fedprime`` on the embedded dataset with tiny-vilt, ``--clients``
(2) clients holding all 2000 training samples between them, ``--local-epochs`` (2) local
epochs, no server-side or client-side evaluation, so that a round is local training plus
aggregation only, and has well over 10 s of compute on a 2-core CPU.

* **Flower**: a real ``flwr run . --stream --federation-config "num-supernodes=N
  client-resources-num-cpus=1"`` from the repository root, with a private ``FLWR_HOME`` and
  private local-SuperLink ports (``fedprime_core.tools.launch.flower_env``, so a concurrent
  ``flwr run`` neither collides with nor receives this run). The per-round wall time
  is the run's ``round-seconds`` (``results-dir/<run-name>/metrics.json``, measured by
  ``FedPrimeStrategy.start_or_resume`` from sending the train messages to the end of aggregation;
  writing results and the checkpoint afterwards is not in it). Round 1 is excluded: it
  includes the one-off start of the simulation engine's actors, loading the backbone,
  building each client's shard and processing its images (cached in memory for later
  rounds). Every process started is stopped afterwards (``tests.processes.stop_marked``,
  matching the private ``FLWR_HOME`` in their environment).
* **direct, sequential**: this process calls ``fedprime_core.runtime.client_train`` for
  each client in turn (torch's default threads), then ``validate_update`` and
  ``aggregate_round``, with the same configuration, seeds and rounds.
* **direct, parallel**: like Flower's simulation (one Ray actor with 1 CPU per client,
  clients training at the same time), one worker process per client with 1 torch thread;
  this process aggregates. This is the like-for-like baseline of the Flower figure.

Both direct loops exclude round 1 in the same way. The train losses of the Flower run and
the direct loops are compared as a check that they did the same work.

Run: ``python benchmarks/framework_overhead.py [--quick] [--out]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from _common import ROOT, load_average, machine, parser, table, write_json


def overrides(args, results_dir: Path) -> dict[str, Any]:
    values: dict[str, Any] = {
        "method": "fedprime",
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "server-eval": False,
        "fraction-evaluate": 0.0,
        "min-train-nodes": args.clients,
        "min-available-nodes": args.clients,
        "results-dir": str(results_dir),
        "run-name": "bench",
        "seed": 42,
    }
    if args.max_train_samples:
        values["max-train-samples"] = args.max_train_samples
    return values


def run_config_string(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())


# ---------------------------------------------------------------------------------------
# Flower
# ---------------------------------------------------------------------------------------
def busy_threads(home: Path, min_cpu_seconds: float = 1.0) -> dict[int, int]:
    """Per ClientApp actor of this run: how many of its threads have used ``min_cpu_seconds`` of CPU.

    Ray sets ``OMP_NUM_THREADS`` inside each actor from its ``num_cpus`` at run time (not
    visible in ``/proc/<pid>/environ``); counting the threads that do the work shows how many
    compute threads a client really trains with.
    """
    from tests.processes import marked_pids

    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in marked_pids(f"FLWR_HOME={home}"):
        try:
            if b"ClientAppActor" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            count = 0
            for task in Path(f"/proc/{pid}/task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                if (int(fields[11]) + int(fields[12])) / tick >= min_cpu_seconds:  # utime + stime
                    count += 1
            found[pid] = count
        except (OSError, IndexError, ValueError):
            continue
    return found


def run_flower(args, work: Path) -> dict[str, Any]:
    from fedprime_core.tools.launch import SUPERLINK_START_FAILURE
    from tests.processes import flower_env, stop_marked

    home = work / "flwr-home"
    home.mkdir()
    results = work / "flower-results"
    env = flower_env(home)  # private FLWR_HOME and local-SuperLink ports
    cmd = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={args.clients} client-resources-num-cpus=1",
        "--run-config",
        run_config_string(overrides(args, results)),
    ]
    print("$ " + " ".join(cmd[:5]) + f" '{cmd[5]}' {cmd[6]} '{cmd[7]}'", flush=True)
    log_path = work / "flwr-run.log"
    busy: dict[int, int] = {}
    for attempt in range(1, 4):  # on a busy machine flwr's local SuperLink may miss its 15 s start-up
        start = time.perf_counter()
        try:
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
                while proc.poll() is None:
                    if time.perf_counter() - start > args.timeout:
                        proc.kill()
                        proc.wait()
                        break
                    for pid, threads in busy_threads(home).items():
                        busy[pid] = max(busy.get(pid, 0), threads)
                    time.sleep(1.0)
        finally:
            stop_marked(f"FLWR_HOME={home}")
        wall = time.perf_counter() - start
        log = log_path.read_text(errors="replace")
        if proc.returncode == 0 or SUPERLINK_START_FAILURE not in log or attempt == 3:
            break
        print(f"  the local SuperLink was slow to start (attempt {attempt} of 3); trying again", flush=True)
    metrics_path = results / "bench" / "metrics.json"
    if proc.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"flwr run failed (exit {proc.returncode}); last output:\n{log[-4000:]}")
    records = [r for r in json.loads(metrics_path.read_text()) if r.get("round", 0) >= 1]
    return {
        "round-seconds": {r["round"]: r["round-seconds"] for r in records},
        "aggregation-seconds": {r["round"]: r.get("aggregation-seconds", float("nan")) for r in records},
        "train-loss": {r["round"]: r.get("train-loss") for r in records},
        "bytes-sent": {r["round"]: r.get("bytes-sent") for r in records},
        "flwr-run-wall-seconds": wall,
        "actor-busy-threads": sorted(busy.values()),
    }


# ---------------------------------------------------------------------------------------
# Direct calls
# ---------------------------------------------------------------------------------------
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _train(values: dict[str, Any], state: dict[str, np.ndarray], pid: int, num: int, rnd: int):
    """One client's local round (runs in this process or in a worker)."""
    from fedprime_core import runtime
    from fedprime_core.config import parse_run_config

    cfg = parse_run_config(values)
    new_state, result, _ = runtime.client_train(cfg, state, pid, num, rnd)
    return new_state, result.num_examples, result.usage, result.loss, result.seconds, result.pattern_usage


def run_direct(args, work: Path, parallel: bool) -> dict[str, Any]:
    from fedprime_core import runtime
    from fedprime_core.config import method_default_sweeps, parse_run_config
    from fedprime_core.method.federated import AggregationSettings, ClientUpdate, GlobalState, validate_update
    from fedprime_core.method.methods import method_spec

    values = overrides(args, work / ("direct-parallel" if parallel else "direct-sequential"))
    cfg = parse_run_config(values)
    spec = method_spec(cfg.method)
    sweeps = cfg.align_sweeps or method_default_sweeps(cfg.method)
    glob = GlobalState(spec, runtime.initial_state(cfg), inter_merge=cfg.inter_merge)
    pools = []
    if parallel:
        ctx = get_context("spawn")
        pools = [ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker) for _ in range(args.clients)]
    out: dict[str, Any] = {"round-seconds": {}, "aggregation-seconds": {}, "train-loss": {}, "client-train-seconds": {}}
    try:
        for rnd in range(1, args.rounds + 1):
            start = time.perf_counter()
            payloads = [glob.client_arrays(str(pid)) for pid in range(args.clients)]
            if parallel:
                futures = [
                    pool.submit(_train, values, payloads[pid], pid, args.clients, rnd) for pid, pool in enumerate(pools)
                ]
                replies = [f.result() for f in futures]
            else:
                replies = [_train(values, payloads[pid], pid, args.clients, rnd) for pid in range(args.clients)]
            updates = [
                ClientUpdate(s, n, usage, str(pid), {"train-loss": loss}, by_pattern)
                for pid, (s, n, usage, loss, _, by_pattern) in enumerate(replies)
            ]
            expected = glob.expected_shapes()
            for update in updates:
                reasons = validate_update(update, expected, spec.pools, cfg.max_update_norm)
                if reasons:
                    raise RuntimeError(f"direct loop produced an invalid update: {reasons}")
            settings = AggregationSettings(
                max_prompts=cfg.inter_pool_max, sweeps=sweeps, seed=cfg.seed * 1000 + rnd, inter_merge=cfg.inter_merge
            )
            report = glob.aggregate(updates, settings)
            out["round-seconds"][rnd] = time.perf_counter() - start
            out["aggregation-seconds"][rnd] = report["aggregation-seconds"]
            weights = [u.num_examples for u in updates]
            out["train-loss"][rnd] = float(np.average([u.metrics["train-loss"] for u in updates], weights=weights))
            out["client-train-seconds"][rnd] = [r[4] for r in replies]
            print(
                f"  direct {'parallel' if parallel else 'sequential'} round {rnd}: "
                f"{out['round-seconds'][rnd]:.2f} s (clients {', '.join(f'{r[4]:.2f}' for r in replies)} s, "
                f"aggregation {report['aggregation-seconds']:.3f} s)",
                flush=True,
            )
    finally:
        for pool in pools:
            pool.shutdown()
    return out


def later_rounds(rounds: dict[Any, float]) -> list[float]:
    """Rounds 2.. (round 1 holds the one-off loading)."""
    return [v for r, v in rounds.items() if int(r) >= 2]


def main() -> None:
    p = parser("framework_overhead", __doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="rounds per run; round 1 is excluded from the figures")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=0, help="0 = all 2000 training samples")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed for the flwr run")
    p.add_argument("--skip-flower", action="store_true", help="only the direct loops")
    p.add_argument("--skip-sequential", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.local_epochs, args.max_train_samples = 2, 1, 200
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (round 1 is excluded)")
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(
        f"fedprime, tiny-vilt, embedded data, {args.clients} clients, "
        f"{args.max_train_samples or 'all'} training samples, {args.local_epochs} local epoch(s), "
        f"batch {args.batch_size}, {args.rounds} rounds (round 1 excluded), no evaluation\n",
        flush=True,
    )
    result: dict[str, Any] = {}
    # Order: direct parallel, Flower, direct sequential, so that a drift in the machine's
    # load does not favour one side of the main comparison.
    with tempfile.TemporaryDirectory(prefix="fedprime-bench-") as tmp:
        work = Path(tmp)
        phases = ["direct-parallel"] + ([] if args.skip_flower else ["flower"])
        phases += [] if args.skip_sequential else ["direct-sequential"]
        for phase in phases:
            before = load_average()
            if phase == "flower":
                result[phase] = run_flower(args, work)
                f = result[phase]
                print(
                    "  flower rounds: "
                    + ", ".join(f"{r}: {s:.2f} s" for r, s in f["round-seconds"].items())
                    + "; aggregation "
                    + ", ".join(f"{s:.3f}" for s in f["aggregation-seconds"].values())
                    + f" s (flwr run wall {f['flwr-run-wall-seconds']:.1f} s; "
                    + f"busy threads per ClientApp actor {f['actor-busy-threads']})",
                    flush=True,
                )
            else:
                result[phase] = run_direct(args, work, parallel=phase == "direct-parallel")
            result[phase]["load-average-before-after"] = [before, load_average()]

    summary: dict[str, Any] = {}
    rows = []
    for name, res in result.items():
        later = later_rounds(res["round-seconds"])
        summary[name] = {"median-round-seconds": statistics.median(later), "min-round-seconds": min(later)}
        rows.append([name, statistics.median(later), min(later), " ".join(f"{x:.2f}" for x in later)])
    par = result["direct-parallel"]
    summary["direct-parallel"]["median-slowest-client-train-seconds"] = statistics.median(
        max(v) for v in later_rounds(par["client-train-seconds"])
    )
    if "direct-sequential" in result:
        summary["direct-sequential"]["median-client-train-seconds-sum"] = statistics.median(
            sum(v) for v in later_rounds(result["direct-sequential"]["client-train-seconds"])
        )
    print(f"\nper-round wall time, rounds 2..{args.rounds}:")
    print(table(["run", "median s", "min s", "rounds"], rows))
    if "flower" in summary:
        for base in ("direct-parallel", "direct-sequential"):
            if base in summary:
                summary[f"ratio-vs-{base.split('-')[1]}"] = {
                    stat: summary["flower"][f"{stat}-round-seconds"] / summary[base][f"{stat}-round-seconds"]
                    for stat in ("median", "min")
                }
        summary["train-loss-per-round"] = {
            name: [res["train-loss"][r] for r in sorted(res["train-loss"], key=int)] for name, res in result.items()
        }
        ratio = summary["ratio-vs-parallel"]
        print(
            f"\nFlower / direct parallel (like for like): {ratio['median']:.3f}x by median round, "
            f"{ratio['min']:.3f}x by fastest round"
        )
        if "ratio-vs-sequential" in summary:
            ratio = summary["ratio-vs-sequential"]
            print(f"Flower / direct sequential: {ratio['median']:.3f}x by median round, {ratio['min']:.3f}x by fastest")
        compute = summary["direct-parallel"]["median-round-seconds"]
        verdict = "met" if summary["ratio-vs-parallel"]["median"] < 1.3 else "MISSED"
        print(f"target: < 1.3x for a round of >= 10 s of compute ({compute:.1f} s here): {verdict}")
        print("train loss per round (same work check): " + json.dumps(summary["train-loss-per-round"]))
    write_json(
        args.out,
        {
            "benchmark": "framework_overhead",
            "machine": info,
            "settings": {
                "clients": args.clients,
                "rounds": args.rounds,
                "local-epochs": args.local_epochs,
                "batch-size": args.batch_size,
                "max-train-samples": args.max_train_samples,
                "model": "tiny-vilt",
                "method": "fedprime",
                "flower-federation-config": f"num-supernodes={args.clients} client-resources-num-cpus=1",
            },
            "runs": result,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
