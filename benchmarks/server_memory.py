"""Peak memory (RSS) of the ServerApp's work for a round at 100 and 1,000 clients, and its growth in n.

What is measured: the real :class:`server_app.strategy.FedPrimeStrategy` running
``start_or_resume`` for two rounds (the ServerApp's loop: sampling, one identity query
per new node in round 1, one message per client with its own inter pool, pulling the
replies, decoding and validating every reply, aggregating it (alignment of the inter
pool, FedAvg of the rest), and writing metrics.json, the summary, clients.json and the
checkpoint after each round) against a :class:`SyntheticGrid` of ``n`` nodes instead of
``n`` ClientApps. The grid answers each identity query with a client id and each train
message with a reply built exactly as a ClientApp builds it
(:func:`fedprime_protocol.messages.train_reply_content`: the arrays it received plus a
small random change, in the run's wire dtype, as a delta when ``upload-delta``, with usage
counts, pattern-usage tables and a client-info record); it keeps no message once it has
answered it. So the process holds what a ServerApp holds: the messages it sent (the
strategy keeps them until the round's replies are in), the pulled replies, their decoded
updates, the global state with every client's personal inter pool, and the results.
Server-side evaluation is off (its cost does not depend on n) and so is client-side
evaluation.

Model: tiny-vilt (width 64) with the paper's prompt sizes (tau 20, kappa 5, 8 classes),
fedprime under ``comm-profile`` paper and minimal. Each (n, profile) runs in a fresh
process; RSS is read from ``/proc/self/status``: ``VmRSS`` after set-up (imports, matplotlib
for the results' plots, backbone, initial state, strategy) is the baseline, and the peak of
each round is ``VmHWM`` with the high-water mark reset (``/proc/self/clear_refs``) at the
start of the round; "held after the round" is ``VmRSS`` at the end of the round after a
garbage collection and ``malloc_trim`` (what is still referenced, not free memory the C
allocator keeps for reuse). The change
the grid adds is 1e-3 per entry, so the warm-started alignment keeps every prompt in its
cluster (the regime of ``benchmarks/aggregation.py``'s *warm* rows).

Run: ``python benchmarks/server_memory.py [--quick] [--out] [--clients 100 1000]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from _common import machine, parser, table, write_json

HERE = Path(__file__).resolve().parent
TAU, KAPPA, NUM_CLASSES, ROUNDS = 20, 5, 8, 2
PROFILES = ("paper", "minimal")
#: Round 1 also asks every node who it is; round 2 is a steady round.
STEADY_ROUND = ROUNDS


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); ``False`` where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``; nothing elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SyntheticGrid:
    """``n`` nodes that answer like ClientApps, from generated data, in this process.

    Node ``i`` (ids ``1..n``) is client ``str(i - 1)``. A train message is answered with its
    own arrays plus a random change of ``drift`` per entry (a delta under ``upload-delta``),
    ``num-examples`` drawn per client, usage counts as training makes them (``kappa`` per sample
    and epoch, a few prompts unused), and a pattern-usage table that adds up to them. Replies
    wait to be pulled, as on a SuperLink; sent messages are not kept.
    """

    pull_interval = 0.0

    def __init__(self, n: int, cfg, seed: int = 0, drift: float = 1e-3) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        self.nodes = list(range(1, n + 1))
        self.cfg = cfg
        self.drift = drift
        self.rng = np.random.default_rng(seed)
        self.replies: dict[str, Any] = {}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        from flwr.app import Message

        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            ids.append(message.metadata.message_id)
            self.replies[message.metadata.message_id] = self.answer(message)
        return ids

    def pull_messages(self, message_ids) -> list[Any]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - the strategy pushes and pulls
        return self.pull_messages(self.push_messages(messages))

    def answer(self, message):
        from flwr.app import Message, MessageType

        from fedprime_core.method.methods import method_spec
        from fedprime_protocol.messages import identity_reply_content, read_arrays, train_reply_content

        client = str(message.metadata.dst_node_id - 1)
        if message.metadata.message_type == MessageType.QUERY:
            return Message(identity_reply_content({"client-id": client}), reply_to=message)
        received = read_arrays(message.content)
        trained = {
            k: v + (self.rng.standard_normal(v.shape) * self.drift).astype(np.float32) for k, v in received.items()
        }
        tau_of = {pool: received[f"pools.{pool}.prompts"].shape[0] for pool in method_spec(self.cfg.method).pools}
        num = int(self.rng.integers(20, 200))
        usage, patterns = {}, {}
        for pool, size in tau_of.items():
            # As real training counts them: kappa selections per sample and epoch, spread over the
            # prompts in use (a few unused) and the three missing patterns.
            used = self.rng.random(size) > 0.2
            used[0] = True
            per_pattern = self.rng.multinomial(num * self.cfg.local_epochs * self.cfg.kappa, [0.3, 0.35, 0.35])
            table = np.stack([self.rng.multinomial(k, used / used.sum()) for k in per_pattern])
            patterns[pool], usage[pool] = table, table.sum(axis=0)
        info = {
            "client-id": client,
            "partition-id": int(client),
            "data": "partition",
            "num-train": num,
            "num-val": max(num // 10, 1),
            "complete": num // 3,
            "text-missing": num // 3,
            "image-missing": num - 2 * (num // 3),
            "mixture": [0.3, 0.35, 0.35],
            "backbone-fingerprint": "synthetic-backbone",
            "labels-fingerprint": "synthetic-labels",
        }
        metrics = {"num-examples": num, "train-loss": 1.0, "train-regulariser": 0.1, "train-seconds": 1.0, "steps": 4}
        content = train_reply_content(
            trained,
            metrics,
            usage,
            info,
            patterns,
            wire_dtype=self.cfg.wire_dtype,
            reference=received if self.cfg.upload_delta else None,
        )
        return Message(content, reply_to=message)


def vilt_b32_state(cfg, path: Path) -> None:
    """Write the initial trainable state of ``cfg``'s model on ViLT-B/32 (``ViltConfig()``, random
    weights: shapes only, nothing is downloaded) to ``path`` (run in its own process, so the 446 MB
    backbone never counts in a measurement)."""
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones.vilt import ViltBackbone
    from fedprime_core.method.model import trainable_state
    from fedprime_core.run_settings import prompted_model

    model = prompted_model(ViltBackbone(ViltModel(ViltConfig())), cfg, NUM_CLASSES, seed=0)
    np.savez(path, **trainable_state(model))


def run_config(n: int, profile: str, method: str, results_dir: str):
    from fedprime_core.config import parse_run_config

    return parse_run_config(
        {
            "method": method,
            "comm-profile": profile,
            "tau": TAU,
            "kappa": KAPPA,
            "num-server-rounds": ROUNDS,
            "min-available-nodes": n,
            "min-train-nodes": n,
            "fraction-train": 1.0,
            "fraction-evaluate": 0.0,
            "server-eval": False,
            "results-dir": results_dir,
            "run-name": "memory",
            "node-wait": 5.0,
        }
    )


def child(n: int, profile: str, method: str, shape: str = "tiny-vilt") -> dict[str, Any]:
    """One measurement in this (fresh) process; returns its figures.

    ``shape``: ``tiny-vilt`` (the model a test run trains) or ``vilt-b32`` (the state of the
    same model on ViLT-B/32, built in another process).
    """
    import gc

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (the results' plots: loaded before the baseline, not per client)

    from fedprime_core import runtime
    from fedprime_core.method.model import state_nbytes
    from fedprime_protocol.messages import state_to_record
    from server_app.strategy import FedPrimeStrategy

    rounds: list[dict[str, Any]] = []
    round_started = [0.0]

    def measured(persist: Any) -> Any:
        """The run's ``persist``, then a reading of the RSS peak (each round's results are written once)."""

        def persist_and_measure(server_round: int, *args: Any, **kwargs: Any) -> None:
            persist(server_round, *args, **kwargs)
            peak, seconds = proc_status("VmHWM"), time.perf_counter() - round_started[0]
            gc.collect()
            trim_heap()  # what is still referenced, not what the allocator keeps for reuse
            rounds.append(
                {"round": server_round, "peak-rss": peak, "rss-after": proc_status("VmRSS"), "seconds": seconds}
            )
            reset_peak()
            round_started[0] = time.perf_counter()

        return persist_and_measure

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(n, profile, method, tmp)
        if shape == "vilt-b32":
            path = Path(tmp) / "state.npz"
            script = (
                "import sys; sys.path.insert(0, sys.argv[1]); import server_memory as m; "
                "m.vilt_b32_state(m.run_config(1, sys.argv[2], sys.argv[3], '.'), m.Path(sys.argv[4]))"
            )
            subprocess.run([sys.executable, "-c", script, str(HERE), profile, method, str(path)], check=True)
            with np.load(path) as stored:
                state = {name: stored[name] for name in stored.files}
        else:
            state = runtime.initial_state(cfg)
        run_dir = Path(tmp) / "memory"
        run_dir.mkdir()
        strategy = FedPrimeStrategy(cfg, run_dir, state)
        strategy.outputs.persist = measured(strategy.outputs.persist)  # the ServerApp's strategy, measured
        grid = SyntheticGrid(n, cfg)
        gc.collect()
        trim_heap()
        baseline = proc_status("VmRSS")
        can_reset = reset_peak()
        round_started[0] = time.perf_counter()
        strategy.start_or_resume(grid, state_to_record(state), num_rounds=ROUNDS, timeout=3600)
        history = json.loads((run_dir / "metrics.json").read_text())
        assert all(r["accepted"] == n for r in history if r["round"] > 0), "every synthetic reply must be accepted"
        checkpoint = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())
        return {
            "clients": n,
            "model-shape": shape,
            "comm-profile": profile,
            "method": method,
            "baseline-rss": baseline,
            "peak-reset-works": can_reset,
            "rounds": rounds,
            "state-bytes": state_nbytes(state),
            "bytes-sent-per-client": history[-1]["bytes-sent-per-client"],
            "bytes-received-per-client": history[-1]["bytes-received-per-client"],
            "inter-pool-size": history[-1].get("inter-pool-size"),
            "run-folder-bytes": checkpoint,
        }


def measure(n: int, profile: str, method: str, shape: str = "tiny-vilt") -> dict[str, Any]:
    """:func:`child` in a fresh Python process (so one measurement's peak cannot leak into the next)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), profile, method, shape]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser("server_memory", __doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=None, help="numbers of clients (default 10 100 1000)")
    p.add_argument(
        "--vilt-b32",
        type=str,
        nargs="*",
        default=None,
        metavar="PROFILE:N",
        help="also measure the ViLT-B/32-sized state, e.g. paper:100 minimal:100 minimal:1000",
    )
    p.add_argument("--child", nargs=4, metavar=("N", "PROFILE", "METHOD", "SHAPE"), help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        n, profile, method, shape = args.child
        print(json.dumps(child(int(n), profile, method, shape)))
        return
    info = machine()
    sizes = args.clients or ([4, 20] if args.quick else [10, 100, 1000])
    profiles = ("minimal",) if args.quick else PROFILES
    plan = [(profile, n, "tiny-vilt") for profile in profiles for n in sizes]
    for item in args.vilt_b32 or []:
        profile, n = item.split(":")
        plan.append((profile, int(n), "vilt-b32"))
    rows = []
    for profile, n, shape in plan:
        row = measure(n, profile, "fedprime", shape)
        first, steady = row["rounds"][0], row["rounds"][STEADY_ROUND - 1]
        row["round-peak-over-baseline"] = max(first["peak-rss"], steady["peak-rss"]) - row["baseline-rss"]
        row["retained-after-round"] = steady["rss-after"] - row["baseline-rss"]
        row["bytes-per-client"] = row["round-peak-over-baseline"] / n
        rows.append(row)
        print(
            f"{shape} {profile:8s} n={n:5d}: peak {row['round-peak-over-baseline'] / 1e6:8.1f} MB over a baseline "
            f"of {row['baseline-rss'] / 1e6:.0f} MB (round 1 {first['seconds']:.1f} s, "
            f"round 2 {steady['seconds']:.1f} s)",
            flush=True,
        )
    # Linear in n: the growth per added client between consecutive sizes (equal slopes: linear).
    growth: dict[str, list[dict[str, float]]] = {}
    for profile in profiles:
        mine = sorted(
            (r for r in rows if r["comm-profile"] == profile and r["model-shape"] == "tiny-vilt"),
            key=lambda r: r["clients"],
        )
        growth[profile] = [
            {
                "from": a["clients"],
                "to": b["clients"],
                "bytes-per-added-client": (b["round-peak-over-baseline"] - a["round-peak-over-baseline"])
                / (b["clients"] - a["clients"]),
            }
            for a, b in zip(mine, mine[1:])
        ]

    def mb(x: float) -> str:
        return f"{x / 1e6:.1f}"

    headers = [
        "model",
        "profile",
        "clients",
        "kB per message (down / up)",
        "round 1 peak MB",
        "round 2 peak MB",
        "held after round 2 MB",
        "kB per client (peak / n)",
        "round 1 / round 2 s",
    ]
    print("\npeak RSS of a round over the process's RSS after set-up (MB = 10^6 bytes); fedprime, tau 20:")
    print(
        table(
            headers,
            [
                [
                    r["model-shape"],
                    r["comm-profile"],
                    f"{r['clients']:,}",
                    f"{r['bytes-sent-per-client'] / 1e3:.1f} / {r['bytes-received-per-client'] / 1e3:.1f}",
                    mb(r["rounds"][0]["peak-rss"] - r["baseline-rss"]),
                    mb(r["rounds"][STEADY_ROUND - 1]["peak-rss"] - r["baseline-rss"]),
                    mb(r["retained-after-round"]),
                    f"{r['bytes-per-client'] / 1e3:.0f}",
                    f"{r['rounds'][0]['seconds']:.1f} / {r['rounds'][STEADY_ROUND - 1]['seconds']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    for profile, steps in growth.items():
        parts = ", ".join(f"{g['from']} -> {g['to']}: {g['bytes-per-added-client'] / 1e3:.0f} kB" for g in steps)
        print(f"tiny-vilt, {profile}: peak growth per added client {parts}")
    write_json(
        args.out,
        {
            "benchmark": "server_memory",
            "machine": info,
            "settings": {"tau": TAU, "kappa": KAPPA, "rounds": ROUNDS, "method": "fedprime", "drift": 1e-3},
            "rows": rows,
            "growth": growth,
        },
    )


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
