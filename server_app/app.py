"""The FedPrime ServerApp: validate the config, prepare (or resume) the run, run the strategy."""

from __future__ import annotations

import datetime as dt
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.result import Result

from fedprime_core import runtime
from fedprime_core.config import (
    PROFILE_VALUES,
    ConfigError,
    RunConfig,
    config_to_dict,
    describe_communication,
    parse_run_config,
)
from fedprime_core.results import find_checkpoint, load_checkpoint, write_json

from .logs import ClientLogGrid, connect
from .messages import record_to_state, state_to_record
from .strategy import FedPrimeStrategy

connect()  # fedprime_core's lines (loading, progress) reach flwr run --stream and flwr log

#: Keys that may differ between a run and its resumption; any other difference is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "num-server-rounds",
        "resume",
        "run-name",
        "results-dir",
        "round-timeout",
        "eval-every",
        "device",
        "num-workers",
        "server-eval",
        "eval-batch-size",
        "min-available-nodes",
        "min-train-nodes",
        "fraction-train",
        "fraction-evaluate",
        "max-update-norm",
    }
)


app = ServerApp()


def default_run_name(cfg: RunConfig) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-{cfg.dataset}-{cfg.missing_setting}-eta{cfg.eta:g}-s{cfg.seed}-{stamp}"


def prepare_run(
    cfg: RunConfig,
) -> tuple[Path, dict[str, np.ndarray] | None, list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """The run folder and, when resuming, the checkpointed state, history, client info and inter pools.

    Raises:
        ConfigError: the resumed run was made with settings that cannot change, or a
            fresh run would overwrite an existing run's checkpoint.
        FileNotFoundError: ``resume`` points at no checkpoint.
    """
    if cfg.resume:
        run_dir = find_checkpoint(cfg.resume)
        state, meta = load_checkpoint(run_dir)
        # A checkpoint from before the communication keys existed exchanged what 'paper' does.
        previous = {"comm-profile": "paper", **PROFILE_VALUES["paper"], **meta.get("config", {})}
        changed = sorted(
            k
            for k, v in config_to_dict(cfg).items()
            if k not in RESUMABLE_CHANGES and k in previous and previous[k] != v
        )
        if changed:
            raise ConfigError(
                "cannot resume "
                + str(run_dir)
                + " with different settings for: "
                + ", ".join(f"'{k}' ({previous[k]!r} -> {getattr(cfg, k.replace('-', '_'), None)!r})" for k in changed)
            )
        log(INFO, "resuming %s after round %d", run_dir, meta.get("round", 0))
        return (
            run_dir,
            state,
            list(meta.get("history", [])),
            dict(meta.get("clients", {})),
            meta.get("inter-pool"),
        )
    run_dir = (Path(cfg.results_dir).expanduser() / (cfg.run_name or default_run_name(cfg))).resolve()
    if (run_dir / "checkpoint.json").exists():
        raise ConfigError(
            f"run folder {run_dir} already holds a run; "
            f"set resume='{run_dir}' to continue it or choose another run-name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None, [], {}, None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a FedPrime federation configured by ``context.run_config``."""
    try:
        cfg = parse_run_config(context.run_config)
        run_dir, state, history, clients, inter_record = prepare_run(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        log(ERROR, "FedPrime cannot start: %s", exc)
        raise
    write_json(run_dir / "config.json", config_to_dict(cfg))
    log(INFO, "FedPrime run: method=%s dataset=%s model=%s; results in %s", cfg.method, cfg.dataset, cfg.model, run_dir)
    log(INFO, "What travels: %s", describe_communication(cfg))

    # Without its own data-dir (sites hold all the data) the server evaluates nothing itself.
    server_eval = cfg.server_eval and runtime.has_data(cfg)
    if cfg.server_eval and not server_eval:
        log(WARNING, "the run config names no data-dir for the server: no server-side evaluation (client-side only)")
    fingerprint = None
    if server_eval or state is None:
        fingerprint = runtime.load_backbone(cfg).fingerprint
    labels = runtime.label_space(cfg)
    if state is None:
        state = runtime.initial_state(cfg)

    def evaluate(server_round: int, global_state: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        return runtime.server_evaluate(cfg, global_state, what=f"round {server_round}")

    strategy = FedPrimeStrategy(
        cfg,
        run_dir,
        state,
        history=history,
        clients=clients,
        server_fingerprint=fingerprint,
        multilabel=labels.metric == "macro_f1",
        labels_fingerprint=labels.fingerprint,
        inter_record=inter_record,
    )
    result = strategy.start(
        grid=ClientLogGrid(grid),  # logs the lines each client returns with its reply
        initial_arrays=state_to_record(state),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=evaluate if server_eval else None,
    )
    save_result(run_dir, result)
    if not strategy.clients:
        log(WARNING, "no client update was accepted in this run")
    log(INFO, "FedPrime finished. Results: %s (summary.md, metrics.csv, curves.png, final.npz)", run_dir)
    summary = run_dir / "summary.md"
    if summary.is_file():
        for line in summary.read_text().splitlines():
            log(INFO, "%s", line)


def save_result(run_dir: Path, result: Result) -> None:
    """Write the strategy's :class:`~flwr.serverapp.strategy.result.Result` with the run's results.

    ``final.npz``: its arrays, the final global trainable state (prompts, keys, query maps,
    pooler, head; load with ``fedprime_core.model.load_trainable_state``). ``result.json``:
    its metric records per round, as the strategy aggregated them (client-side train and
    evaluate metrics, server-side evaluation), for the rounds this process ran.
    """
    tmp = run_dir / "final.npz.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, **record_to_state(result.arrays))
    tmp.replace(run_dir / "final.npz")

    def rounds(records: dict[int, Any]) -> dict[str, dict[str, Any]]:
        return {str(r): dict(records[r]) for r in sorted(records)}

    write_json(
        run_dir / "result.json",
        {
            "train_metrics_clientapp": rounds(result.train_metrics_clientapp),
            "evaluate_metrics_clientapp": rounds(result.evaluate_metrics_clientapp),
            "evaluate_metrics_serverapp": rounds(result.evaluate_metrics_serverapp),
        },
    )
