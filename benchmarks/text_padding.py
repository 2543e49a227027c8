"""What ``text-padding = batch`` saves: one client's local round with texts padded to
``text-max-length`` (``fixed``) against texts padded only to each batch's longest (``batch``).

Both arms run the same client, through the same code the ClientApp runs
(``fedprime_core.runtime.client_shard`` / ``build_model``, ``train_local``, ``evaluate``): one
epoch of training over client 0's shard from the same initial state and the same shuffle,
then an evaluation of its test set, on one thread, alternated ``--repeats`` times (median
time). It prints samples per second of each, the mean number of text positions per training
batch, and how far apart the two arms end: the largest
difference between their trained states and between their test accuracies (padding is
masked, so the arms may differ by float rounding only; over a whole epoch of SGD the rounding
can grow, which these figures show).

    # the fashion benchmark (docs/datasets/fashion.md) with the shipped MiniLM encoder
    python benchmarks/text_padding.py --dataset fashion --data-dir /data/fashion \\
        --backbone text-encoder --model all-MiniLM-L6-v2 --out
    python benchmarks/text_padding.py --quick      # embedded set, tiny-bert, seconds

Any run-config key can be set with ``--set key=value`` (e.g. ``--set method=fedavg-p``).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from _common import machine, parser, table, write_json

from fedprime_core import runtime
from fedprime_core.config import parse_run_config
from fedprime_core.data.processing import make_loader
from fedprime_core.devices import single_thread
from fedprime_core.method.model import load_trainable_state, trainable_state
from fedprime_core.method.training import evaluate, train_local
from fedprime_core.run_settings import train_settings


def positions_per_batch(loader) -> float:
    """Mean number of text positions per batch that ``loader`` yields."""
    return float(np.mean([batch["input_ids"].shape[1] for batch in loader]))


def run_arm(cfg, shard, start: dict[str, np.ndarray], trim: bool) -> dict[str, Any]:
    model = runtime.build_model(cfg)
    load_trainable_state(model, start)
    train = make_loader(shard.train, cfg.batch_size, shuffle=True, seed=0, trim_text=trim)
    test_data = shard.test if shard.test is not None else shard.val
    test = make_loader(test_data, cfg.eval_batch_size, shuffle=False, trim_text=trim)
    began = time.perf_counter()
    result = train_local(model, train, train_settings(cfg), multilabel=shard.train.multilabel)
    train_seconds = time.perf_counter() - began
    began = time.perf_counter()
    metrics = evaluate(model, test, test_data.multilabel)
    eval_seconds = time.perf_counter() - began
    return {
        "padding": "batch" if trim else "fixed",
        "train-samples": len(shard.train),
        "train-seconds": train_seconds,
        "train-samples-per-second": len(shard.train) / train_seconds,
        "train-loss": float(result.loss),
        "eval-samples": len(test_data),
        "eval-seconds": eval_seconds,
        "eval-samples-per-second": len(test_data) / eval_seconds,
        "accuracy": float(metrics["accuracy"]),
        "text-positions-per-train-batch": positions_per_batch(train),
        "state": trainable_state(model),
    }


def main() -> None:
    p = parser("text_padding", __doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--data-dir", default="")
    p.add_argument("--backbone", default="text-encoder")
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--clients", type=int, default=20, help="partitions; client 0's shard is timed (default 20)")
    p.add_argument("--max-train-samples", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm, alternated; median time (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other run-config key")
    args = p.parse_args()
    info = machine()  # the load average at the start
    raw: dict[str, Any] = {
        "dataset": args.dataset,
        "data-dir": args.data_dir,
        "backbone": args.backbone,
        "model": args.model,
        "max-train-samples": 400 if args.quick else args.max_train_samples,
        "client-test-samples": 60 if args.quick else 200,
        "missing-setting": "miss-both",
        "eta": 0.7,
        "device": "cpu",
    }
    for item in args.set:
        key, _, value = item.partition("=")
        raw[key] = value
    cfg = parse_run_config(raw)
    clients = 2 if args.quick else args.clients
    shard = runtime.client_shard(cfg, 0, clients)
    start = trainable_state(runtime.build_model(cfg))
    repeats = 1 if args.quick else args.repeats
    with single_thread():
        runs = [run_arm(cfg, shard, copy.deepcopy(start), trim) for _ in range(repeats) for trim in (False, True)]
    arms = []
    for padding in ("fixed", "batch"):  # the median time of the repeats (alternated, so drift hits both arms)
        mine = [r for r in runs if r["padding"] == padding]
        arm = dict(mine[0])
        for key in ("train", "eval"):
            seconds = float(np.median([r[f"{key}-seconds"] for r in mine]))
            arm[f"{key}-seconds"] = seconds
            arm[f"{key}-samples-per-second"] = arm[f"{key}-samples"] / seconds
        arm["repeats"] = len(mine)
        arms.append(arm)
    fixed, batch = arms
    drift = max(float(np.max(np.abs(fixed["state"][k] - batch["state"][k]))) for k in fixed["state"])
    for arm in arms:
        del arm["state"]
    figures = {
        "config": {k: raw[k] for k in sorted(raw)},
        "clients": clients,
        "arms": arms,
        "train-speedup": batch["train-samples-per-second"] / fixed["train-samples-per-second"],
        "eval-speedup": batch["eval-samples-per-second"] / fixed["eval-samples-per-second"],
        "max-abs-state-difference-after-one-epoch": drift,
        "accuracy-difference-points": 100.0 * (batch["accuracy"] - fixed["accuracy"]),
    }
    print(
        table(
            ["padding", "text positions / batch", "train samples/s", "eval samples/s", "train loss", "test accuracy"],
            [
                [
                    a["padding"],
                    a["text-positions-per-train-batch"],
                    a["train-samples-per-second"],
                    a["eval-samples-per-second"],
                    a["train-loss"],
                    a["accuracy"],
                ]
                for a in arms
            ],
        )
    )
    print(
        f"speed-up: train {figures['train-speedup']:.2f}x, eval {figures['eval-speedup']:.2f}x; after one epoch "
        f"the trained states differ by at most {drift:.2e}, the accuracies by "
        f"{figures['accuracy-difference-points']:+.2f} points"
    )
    write_json(args.out, {"benchmark": "text_padding", "machine": info, **figures})


if __name__ == "__main__":
    main()
