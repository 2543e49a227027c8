"""How many distinct test rows a grid's client-side evaluation covers, per seed (reads no result).

Each partitioned client draws its ``client-test-samples`` rows from the test split on its own
(with its label proportions and its own missing mix), so rows recur between clients: a run's
``num-supernodes x client-test-samples`` evaluations cover fewer distinct rows. This builds
every client's shard as a run would (``runtime.client_shard``; images are not decoded, the
backbone is not loaded) for one arm of the grid and prints, per seed, the evaluations and the
distinct rows. The shards do not depend on the method, so one arm stands for all.

    python scripts/client_test_rows.py experiments/fashion-study.yaml [--method fed-intra]
"""

from __future__ import annotations

import argparse
import types

from fedprime_core import runtime
from fedprime_core.backbones import needs_image_features
from fedprime_core.config import cache_key, parse_run_config
from fedprime_core.tools.experiments.plan import load_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a grid file whose cells use partitioned clients")
    parser.add_argument("--method", default="fed-intra", help="the arm whose cells are read (default fed-intra)")
    args = parser.parse_args()
    plan = load_plan(args.grid)
    clients = int(plan.federation.get("num-supernodes", 0))
    if clients < 1:
        parser.error(f"{args.grid}: its federation names no num-supernodes")
    splits = None
    for cell in plan.cells:
        values = plan.resolve_paths(cell.config)
        if values["method"] != args.method:
            continue
        cfg = parse_run_config(values)
        if splits is None:
            splits = runtime.read_dataset(cfg, verify_images=False)  # as a run reads it, images undecoded
        runtime._CACHE[cache_key(cfg, "splits")] = splits
        backbone = cache_key(cfg, "backbone") + (cache_key(cfg, "splits") if needs_image_features(cfg.backbone) else ())
        runtime._CACHE[backbone] = types.SimpleNamespace(processor=None)  # shards only keep the processor
        rows = [s.uid for pid in range(clients) for s in runtime.client_shard(cfg, pid, clients).test.samples]
        print(f"seed {cfg.seed}: {len(rows)} client test rows, {len(set(rows))} distinct", flush=True)
        runtime.forget_cached(keep=())


if __name__ == "__main__":
    main()
