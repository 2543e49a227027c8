"""Two alignment engines alternating in one process: the speed-up under the same load.

``aggregation.py --regimes --baseline-tree`` runs the old checkout's child before this one's,
in separate processes, so on a loaded machine the two can see different loads. This script
loads another engine module (``fedprime_core/method/aggregation.py`` of the code before a
change, e.g. from ``git show eac8698:fedprime_core/method/aggregation.py > /tmp/old_agg.py``),
and times it and this checkout's ``align_prompts`` alternately on the same planted round
(``aggregation.make_scale_round``), one thread, printing the median CPU and wall seconds of
each, their ratio, whether both gave the same assignments and centres, and the ARI.

Run: ``OMP_NUM_THREADS=1 python benchmarks/alignment_ab.py --old /tmp/old_agg.py --clients 1000 --reps 3``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import _common  # noqa: F401  (puts the repository root on sys.path)
import aggregation as bench
import numpy as np
import torch

from fedprime_core.method import aggregation as new_engine
from fedprime_core.metrics import adjusted_rand_index


def load_engine(path: str):
    spec = importlib.util.spec_from_file_location("old_alignment_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_alignment_engine"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def align(engine, data, regime: str):
    spec = bench.REGIMES[regime]
    return engine.align_prompts(
        data["prompts"],
        client_keys=data["keys"],
        init_assignments=None if spec["start"] == "cold" else data[spec["start"]],
        prompt_weights=data["weights"],
        client_features=None if spec["on"] == "prompt" else data[spec["on"]],
        n_sweeps=bench.SWEEPS,
        seed=1,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="path of the other engine's aggregation.py")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--regimes", default=",".join(bench.REGIMES))
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    old = load_engine(args.old)
    regimes = args.regimes.split(",")
    warm = bench.make_scale_round(12, seed=99)
    for regime in regimes:  # first use of torch / BLAS kernels: not timed
        align(old, warm, regime)
        align(new_engine, warm, regime)
    data = bench.make_scale_round(args.clients, seed=args.clients)
    truth = np.concatenate(data["truth"])
    for regime in regimes:
        runs: dict[str, list] = {"old": [], "new": []}
        for _ in range(args.reps):
            for name, engine in (("old", old), ("new", new_engine)):
                wall, cpu = time.perf_counter(), time.process_time()
                result = align(engine, data, regime)
                runs[name].append((time.perf_counter() - wall, time.process_time() - cpu, result))
        a, b = runs["old"][-1][2], runs["new"][-1][2]
        same = all(np.array_equal(x, y) for x, y in zip(a.assignments, b.assignments)) and np.array_equal(
            a.centres, b.centres
        )
        cpu_old, cpu_new = (float(np.median([r[1] for r in runs[k]])) for k in ("old", "new"))
        wall_old, wall_new = (float(np.median([r[0] for r in runs[k]])) for k in ("old", "new"))
        ari = adjusted_rand_index(np.concatenate(b.assignments), truth)
        print(
            f"n={args.clients} {regime:12s} old CPU {cpu_old:.3f} s (wall {wall_old:.3f}) | new CPU {cpu_new:.3f} s "
            f"(wall {wall_new:.3f}) | {cpu_old / cpu_new:.2f}x  same-as-old {same}  ARI {ari:.4f}  "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
