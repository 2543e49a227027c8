"""Bytes per client per round of every method and every comm profile, for ViLT-B/32, against the full model.

The model is ``PromptedModel(ViltBackbone(ViltModel(ViltConfig())))``: random weights with
exactly the architecture of ``dandelin/vilt-b32-mlm`` (hidden 768, 12 blocks, 384-px
images, 32-px patches, 40 text positions), paper settings (tau 20, kappa 5, 1 token per
prompt, 8 classes; fedavg-p: 16 tokens at blocks 0-5), built for each ``comm-profile``
as a run builds it (``fedprime_core.run_settings.prompted_model``): ``paper`` (float32, dense query maps,
pooler and head), ``lean`` (float16 with delta uploads, rank-8 query maps), ``minimal``
(lean plus a rank-16 head and a rank-8 update of the frozen pretrained pooler); see
``fedprime_core.config``.

* **download**: what ``FedPrimeStrategy.configure_train`` sends each sampled client: the
  ``"arrays"`` ArrayRecord of the state in the profile's ``wire-dtype``
  (``ArrayRecord.count_bytes()``, what the run's ``bytes-sent`` metric counts).
* **upload**: the client's reply (``fedprime_protocol.messages.train_reply_content``): the trained
  state (or, with ``upload-delta``, its change; same names, shapes and bytes) in the wire
  dtype, plus the wire tag, the metrics, the prompt usage counts and the client-info
  records (every record of the reply). ``upload-array-bytes`` is its ``"arrays"`` record
  alone, what the run's ``bytes-received`` metric counts (tests/test_minimal.py checks that
  a run's metrics.json holds exactly :func:`profile_bytes`'s figures).

Aligned inter pools change size between rounds (the number of clusters, at most
``inter-pool-max`` = 100): both the round-1 size (tau = 20) and the largest size are
reported; personalised inter pools (fedprime, fed-inter, fedprox-p) always send each client
its own tau prompts, so their largest download is the round-1 one.

Run: ``python benchmarks/communication.py [--quick] [--out]``.
"""

from __future__ import annotations

from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from _common import machine, parser, table, write_json

from fedprime_core.config import COMM_PROFILES, METHODS, RunConfig, parse_run_config
from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import state_nbytes, trainable_state
from fedprime_core.run_settings import prompted_model

NUM_CLASSES, TAU, KAPPA, INTER_POOL_MAX = 8, 20, 5, 100
#: What each profile must reach for fedprime: each direction at most this share of the full model.
TARGET_SHARES = {"lean": 0.01, "minimal": 0.0025}
#: Other ways to cut bytes, weighed for ``minimal`` (fedprime rows; run-config keys over a profile).
OPTIONS_WEIGHED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lean", {"head-rank": 16}),
    ("lean", {"pooler-rank": 8}),
    ("lean", {"head-rank": 16, "exchange-pooler": False}),
    ("minimal", {"head-rank": 8}),
    ("minimal", {"wire-dtype": "float32", "upload-delta": False}),
)

GROUPS = (
    ("pools.intra.prompts", "intra prompts"),
    ("pools.intra.keys", "intra keys"),
    ("pools.intra.query", "intra query map"),
    ("pools.inter.prompts", "inter prompts"),
    ("pools.inter.keys", "inter keys"),
    ("pools.inter.query", "inter query map"),
    ("map_prompts", "missing-aware prompts"),
    ("pooler", "pooler"),
    ("head", "head"),
)


def build_backbone(quick: bool):
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones.vilt import ViltBackbone

    # --quick: a 2-block ViLT of the same width (the exchanged parts do not depend on depth,
    # except fedavg-p's missing-aware prompts, which stop at the last block).
    config = ViltConfig(num_hidden_layers=2) if quick else ViltConfig()
    return ViltBackbone(ViltModel(config)), config


def resized(state: dict[str, np.ndarray], pools: tuple[str, ...], size: int) -> dict[str, np.ndarray]:
    """The state with the given pools holding ``size`` prompts (what clients receive later)."""
    out = dict(state)
    for pool in pools:
        for part in ("prompts", "keys"):
            key = f"pools.{pool}.{part}"
            if key in state:  # PFPT's pool has no keys: the prompt is its own key
                out[key] = np.zeros((size, *state[key].shape[1:]), dtype=np.float32)
    return out


def wire_bytes(state: dict[str, np.ndarray], spec, cfg) -> tuple[int, int, int]:
    """(download, upload arrays, whole upload) bytes as the strategy and the ClientApp build them under ``cfg``."""
    from fedprime_protocol.messages import ARRAYS, encode_arrays, train_reply_content

    download = encode_arrays(state, cfg.wire_dtype)[ARRAYS].count_bytes()
    usage = {pool: np.ones(state[f"pools.{pool}.prompts"].shape[0], dtype=np.int64) for pool in spec.pools}
    metrics = {"num-examples": 1000, "train-loss": 1.0, "train-regulariser": 0.1, "train-seconds": 10.0, "steps": 32}
    client = {
        "partition-id": 0,
        "num-train": 1000,
        "mixture": [0.3, 0.35, 0.35],
        "backbone-fingerprint": "0123456789abcdef",
        "complete": 300,
        "text-missing": 350,
        "image-missing": 350,
    }
    reference = state if cfg.upload_delta else None
    content = train_reply_content(state, metrics, usage, client, wire_dtype=cfg.wire_dtype, reference=reference)
    upload = sum(record.count_bytes() for record in content.values())
    return int(download), int(content.array_records[ARRAYS].count_bytes()), int(upload)


def profile_bytes(backbone, cfg: RunConfig, num_classes: int) -> dict[str, Any]:
    """What a client of a ``cfg`` run on ``backbone`` receives and sends in round 1, in bytes.

    Returns ``{"state", "download-bytes", "upload-array-bytes", "upload-bytes"}``: the
    trainable state of the model the run builds, the download (its ``bytes-sent`` per
    client), the reply's arrays (its ``bytes-received`` per client) and the whole reply.
    """
    model = prompted_model(backbone, cfg, num_classes, seed=0)
    state = trainable_state(model)
    down, up_arrays, up = wire_bytes(state, method_spec(cfg.method), cfg)
    return {"state": state, "download-bytes": down, "upload-array-bytes": up_arrays, "upload-bytes": up}


def breakdown(state: dict[str, np.ndarray], bytes_per_value: int) -> dict[str, int]:
    out = {}
    for prefix, label in GROUPS:
        nbytes = sum(v.size * bytes_per_value for k, v in state.items() if k.startswith(prefix))
        if nbytes:
            out[label] = int(nbytes)
    return out


def measure(backbone, method: str, profile: str, full_bytes: int, **keys: Any) -> dict[str, Any]:
    """One row: parameters and bytes of ``method`` under ``profile`` (``keys``: run-config keys set over it)."""
    cfg = parse_run_config({"method": method, "comm-profile": profile, "tau": TAU, "kappa": KAPPA, **keys})
    spec = method_spec(method)
    sent = profile_bytes(backbone, cfg, NUM_CLASSES)
    state, down, up = sent["state"], sent["download-bytes"], sent["upload-bytes"]
    value_bytes = 2 if cfg.wire_dtype in ("float16", "bfloat16") else 4
    row: dict[str, Any] = {
        "method": method,
        "comm-profile": profile,
        "label": ", ".join([profile, *(f"{k}={str(v).lower()}" for k, v in keys.items())]),
        "wire-dtype": cfg.wire_dtype,
        "upload-delta": cfg.upload_delta,
        "query-rank": cfg.query_rank,
        "exchange-pooler": cfg.exchange_pooler,
        "head-rank": cfg.head_rank,
        "pooler-rank": cfg.pooler_rank,
        "trainable-parameters": int(sum(v.size for v in state.values())),
        "state-bytes": state_nbytes(state),
        "download-bytes": down,
        "upload-array-bytes": sent["upload-array-bytes"],
        "upload-bytes": up,
        "breakdown-bytes": breakdown(state, value_bytes),
        "aligned-pools": list(spec.aligned_pools),
    }
    growing = [p for p in spec.aligned_pools if p not in spec.personalised_pools]
    if growing:
        big = resized(state, tuple(growing), INTER_POOL_MAX)
        row["download-bytes-max"], _, row["upload-bytes-max"] = wire_bytes(big, spec, cfg)
    else:
        row["download-bytes-max"], row["upload-bytes-max"] = down, up
    row["download-share-of-full-model"] = down / full_bytes
    row["upload-share-of-full-model"] = up / full_bytes
    row["full-model-over-upload"] = full_bytes / up
    return row


def main() -> None:
    p = parser("communication", __doc__.splitlines()[0])
    args = p.parse_args()
    info = machine()
    backbone, config = build_backbone(args.quick)
    full_params = sum(t.numel() for t in backbone.vilt.parameters())
    full_bytes = sum(t.numel() * t.element_size() for t in backbone.vilt.state_dict().values())
    print(
        f"ViLT{'-B/32' if not args.quick else ' (2-block quick variant)'}: {full_params / 1e6:.1f} M parameters, "
        f"{full_bytes / 1e6:.1f} MB in float32 (hidden {config.hidden_size}, {config.num_hidden_layers} blocks, "
        f"{config.image_size}-px images, {config.patch_size}-px patches, "
        f"{config.max_position_embeddings} text positions)\n"
    )
    rows = [measure(backbone, method, profile, full_bytes) for profile in COMM_PROFILES for method in METHODS]
    # What lean would send with the pretrained pooler frozen at home (lean's definition until the
    # experiments showed its accuracy cost: experiments/README.md, 'Communication profiles').
    rows += [measure(backbone, m, "lean", full_bytes, **{"exchange-pooler": False}) for m in ("fedprime", "fedavg-p")]
    weighed = [measure(backbone, "fedprime", profile, full_bytes, **keys) for profile, keys in OPTIONS_WEIGHED]

    def mb(x: int) -> str:
        return f"{x / 1e6:.2f}"

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    print(
        f"bytes per client per round (MB = 10^6 bytes), inter pool {TAU} in round 1; "
        f"PFPT's pool can grow to {INTER_POOL_MAX}:"
    )
    print(
        table(
            [
                "profile",
                "method",
                "trainable params",
                "download MB",
                "upload MB",
                "% of full model (down / up)",
                f"largest down / up MB (pool {INTER_POOL_MAX})",
                "full model / upload",
            ],
            [
                [
                    r["label"],
                    r["method"],
                    f"{r['trainable-parameters']:,}",
                    mb(r["download-bytes"]),
                    mb(r["upload-bytes"]),
                    f"{pct(r['download-share-of-full-model'])} / {pct(r['upload-share-of-full-model'])}",
                    f"{mb(r['download-bytes-max'])} / {mb(r['upload-bytes-max'])}",
                    f"{r['full-model-over-upload']:.0f}x",
                ]
                for r in rows
            ],
        )
    )
    print(f"\nfull ViLT model: {mb(full_bytes)} MB ({full_params:,} parameters)")
    labels = [label for _, label in GROUPS if any(label in r["breakdown-bytes"] for r in rows)]
    print("\nwhere the bytes go (the exchanged arrays in the wire dtype, kB = 10^3 bytes, round-1 pool sizes):")
    print(
        table(
            ["profile", "method", *labels],
            [
                [r["label"], r["method"], *(f"{r['breakdown-bytes'].get(lb, 0) / 1e3:.1f}" for lb in labels)]
                for r in rows
            ],
        )
    )
    print("\nother ways to cut fedprime's bytes, weighed for minimal (run-config keys over a profile):")
    print(
        table(
            ["profile and keys", "trainable params", "download MB", "upload MB", "% of full model (down / up)"],
            [
                [
                    r["label"],
                    f"{r['trainable-parameters']:,}",
                    mb(r["download-bytes"]),
                    mb(r["upload-bytes"]),
                    f"{pct(r['download-share-of-full-model'])} / {pct(r['upload-share-of-full-model'])}",
                ]
                for r in weighed
            ],
        )
    )
    paper = next(r for r in rows if r["method"] == "fedprime" and r["label"] == "paper")
    for profile, target in TARGET_SHARES.items():
        row = next(r for r in rows if r["method"] == "fedprime" and r["label"] == profile)
        worst = max(row["download-share-of-full-model"], row["upload-share-of-full-model"])
        print(
            f"\nfedprime, {profile}: {mb(row['download-bytes'])} MB down and {mb(row['upload-bytes'])} MB up per "
            f"client per round = {pct(row['download-share-of-full-model'])}% / "
            f"{pct(row['upload-share-of-full-model'])}% of the full model (target: at most {100 * target:g}% each "
            f"way: {'met' if worst <= target else 'NOT met'}); paper sends "
            f"{paper['upload-bytes'] / row['upload-bytes']:.1f}x more."
        )
    print(
        "upload = the arrays plus the reply's wire tag, metrics, usage counts and client info (a few hundred "
        "bytes). centralized-p has one data owner: its 'round' is the owner's training, nothing crosses a "
        "network in practice. pfpt keeps PFPT's own dense, bias-free query projection under any query-rank."
    )
    write_json(
        args.out,
        {
            "benchmark": "communication",
            "machine": info,
            "settings": {
                "model": "ViltModel(ViltConfig())" + (" with 2 blocks (--quick)" if args.quick else ""),
                "num-classes": NUM_CLASSES,
                "tau": TAU,
                "kappa": KAPPA,
                "inter-pool-max": INTER_POOL_MAX,
                "target-shares": TARGET_SHARES,
            },
            "full-model-parameters": int(full_params),
            "full-model-bytes": int(full_bytes),
            "rows": rows,
            "options-weighed": weighed,
        },
    )


if __name__ == "__main__":
    main()
