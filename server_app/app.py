"""The FedPrime ServerApp: validate the config, prepare (or resume) the run, run the strategy.

Only one ServerApp writes a run folder at a time (``run.lock``, :mod:`fedprime_core.runlock`);
a run that cannot learn, or whose SuperLink is gone, raises
:class:`~fedprime_core.failures.RunFailed`, so Flower records the run as failed and the
ServerApp process exits with a non-zero status.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.result import Result

from fedprime_core import runtime
from fedprime_core.atomic import atomic_write
from fedprime_core.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    describe_communication,
    parse_run_config,
)
from fedprime_core.data.records import DataError
from fedprime_core.failures import RunFailed
from fedprime_core.results import (
    CHECKPOINT_META,
    find_checkpoint,
    load_checkpoint,
    mark_failed,
    resume_conflicts,
    write_json,
)
from fedprime_core.runguard import RunGuard
from fedprime_core.runlock import RunFolderBusy, RunLock
from fedprime_protocol.logs import ClientLogGrid, connect, mark_reported
from fedprime_protocol.messages import (
    record_to_state,
    state_to_record,
)

from .census import admit_sites, cannot_start, node_census, partition_count
from .sites import site_verdicts
from .strategy import FedPrimeStrategy
from .watchdog import SuperLinkWatchdog, superlink_address

connect()  # fedprime_core's lines (loading, progress) reach flwr run --stream and flwr log

app = ServerApp()


def default_run_name(cfg: RunConfig) -> str:
    """``method-dataset-setting-sSEED-stamp``; the setting names eta only where it applies."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if cfg.missing_table:
        setting = "table"
    elif cfg.missing_setting == "none":
        setting = "none"
    else:
        setting = f"{cfg.missing_setting}-eta{cfg.eta:g}"
    return f"{cfg.method}-{cfg.dataset}-{setting}-s{cfg.seed}-{stamp}"


def run_folder(cfg: RunConfig) -> Path:
    """The folder this run writes: the resumed run's, or ``results-dir/run-name``.

    Raises:
        FileNotFoundError: ``resume`` points at no checkpoint.
    """
    if cfg.resume:
        return find_checkpoint(cfg.resume).resolve()
    return (Path(cfg.results_dir).expanduser() / (cfg.run_name or default_run_name(cfg))).resolve()


def prepare_run(
    cfg: RunConfig, run_dir: Path | None = None
) -> tuple[Path, dict[str, np.ndarray] | None, list[dict[str, Any]], dict[str, Any], dict[str, Any] | None, str | None]:
    """The run folder and, when resuming, the checkpointed state, history, client info, inter pools and
    the federation's frozen-backbone fingerprint (``None`` for a fresh run, or where none was recorded).

    Call it holding the folder's :class:`~fedprime_core.runlock.RunLock`, so nobody
    writes the checkpoint while it is read.

    Raises:
        ConfigError: the resumed run was made with settings that cannot change, or a
            fresh run would overwrite an existing run's checkpoint.
        FileNotFoundError: ``resume`` points at no checkpoint.
    """
    run_dir = run_dir or run_folder(cfg)
    if cfg.resume:
        state, meta = load_checkpoint(run_dir)
        changed = resume_conflicts(meta.get("config", {}), config_to_dict(cfg))
        if changed:
            raise ConfigError(f"cannot resume {run_dir} with different settings for: {', '.join(changed)}")
        log(INFO, "resuming %s after round %d", run_dir, meta.get("round", 0))
        return (
            run_dir,
            state,
            list(meta.get("history", [])),
            dict(meta.get("clients", {})),
            meta.get("inter-pool"),
            meta.get("fingerprint") if isinstance(meta.get("fingerprint"), str) else None,
        )
    if (run_dir / CHECKPOINT_META).exists():
        raise ConfigError(
            f"run folder {run_dir} already holds a run; "
            f"set resume='{run_dir}' to continue it or choose another run-name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None, [], {}, None, None


def server_fingerprint(cfg: RunConfig, server_eval: bool, *, resumed: bool, recorded: str | None) -> str | None:
    """The frozen backbone's fingerprint every reply is checked against (a reply made with another
    backbone would train another model).

    The server's own backbone's when it loads one anyway (a fresh run builds the initial state
    from it; a run with server-side evaluation evaluates with it). A resumed run without
    server-side evaluation takes the one its checkpoint recorded, so no reply can set it; only
    where the checkpoint recorded none does the first reply that carries one set it.
    """
    if server_eval or not resumed:
        return runtime.process_backbone(cfg).fingerprint
    return recorded


def folder_problem(run_dir: Path | str, exc: OSError) -> str:
    """What is wrong with a run folder the ServerApp cannot create, lock or write, and what to do."""
    what = exc.strerror or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(run_dir) else ""
    return (
        f"the run folder {run_dir} cannot be created or written: {what}{where} [{type(exc).__name__}]; "
        "set results-dir to a folder this ServerApp can write (an absolute path on the machine it runs on)"
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a FedPrime federation configured by ``context.run_config``."""
    folder: Path | str = "?"
    try:
        cfg = parse_run_config(context.run_config)
        folder = run_folder(cfg)
        lock = RunLock(folder, purpose=f"ServerApp of run {context.run_id}").acquire()
    except (ConfigError, FileNotFoundError, RunFolderBusy) as exc:
        cannot_start(exc)
        raise
    except OSError as exc:  # results-dir under a regular file, read-only, full
        log(ERROR, "FedPrime cannot start: %s", folder_problem(folder, exc))
        raise
    watchdog = guard = None
    try:
        try:
            run_dir, state, history, clients, inter_record, resumed_fingerprint = prepare_run(cfg, lock.path.parent)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            cannot_start(exc)
            raise
        except OSError as exc:
            log(ERROR, "FedPrime cannot start: %s", folder_problem(lock.path.parent, exc))
            raise
        address = superlink_address(grid)
        guard = RunGuard(run_dir, address).start()  # marks the summary failed if this process is killed
        if cfg.superlink_timeout > 0 and address:
            watchdog = SuperLinkWatchdog(address, cfg.superlink_timeout).start()
        _run(cfg, grid, run_dir, state, history, clients, inter_record, watchdog, resumed_fingerprint)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if guard is not None:
            guard.stop()
        lock.release()
        with contextlib.suppress(OSError):
            lock.path.parent.rmdir()  # only a folder this start created and left empty


def _run(
    cfg: RunConfig,
    grid: Grid,
    run_dir: Path,
    state: dict[str, np.ndarray] | None,
    history: list[dict[str, Any]],
    clients: dict[str, Any],
    inter_record: dict[str, Any] | None,
    watchdog: SuperLinkWatchdog | None,
    resumed_fingerprint: str | None = None,
) -> None:
    try:
        census, failed = node_census(grid, cfg, watchdog)
        labels = runtime.check_server_inputs(cfg, partition_count(census))
    except (ConfigError, DataError, FileNotFoundError, ValueError, RunFailed) as exc:
        cannot_start(exc)
        raise
    exposed = ray_address()
    if exposed:
        log(
            WARNING,
            "Ray (the simulation engine) listens on %s, not only on this machine: export "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before `flwr run` to keep it on 127.0.0.1",
            exposed,
        )
    try:
        write_json(run_dir / "config.json", config_to_dict(cfg))
    except OSError as exc:
        log(ERROR, "FedPrime cannot start: %s", folder_problem(run_dir, exc))
        raise
    log(INFO, "FedPrime run: method=%s dataset=%s model=%s; results in %s", cfg.method, cfg.dataset, cfg.model, run_dir)
    log(INFO, "What travels: %s", describe_communication(cfg))

    # Without its own data-dir (sites hold all the data) the server evaluates nothing itself.
    server_eval = cfg.server_eval and runtime.has_data(cfg)
    if cfg.server_eval and not server_eval:
        log(WARNING, "the run config names no data-dir for the server: no server-side evaluation (client-side only)")
    fingerprint = server_fingerprint(cfg, server_eval, resumed=state is not None, recorded=resumed_fingerprint)
    verdicts = site_verdicts(census, failed, labels_fingerprint=labels.fingerprint, backbone_fingerprint=fingerprint)
    admit_sites(cfg, grid, run_dir, verdicts, labels.metric == "macro_f1", clients)
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
        stop_check=watchdog.stop_reason if watchdog else None,
    )
    strategy.identities.learn_census(census)
    strategy.identities.take_verdicts(verdicts.values())
    try:
        result = strategy.start_or_resume(
            grid=ClientLogGrid(grid),  # logs the lines each client returns with its reply
            initial_arrays=state_to_record(state),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            evaluate_held_out=evaluate if server_eval else None,
        )
    except RunFailed as exc:
        log(ERROR, "FedPrime stopped. Results so far: %s (summary.md says why)", run_dir)
        mark_reported(exc)
        raise
    try:
        save_result(run_dir, result)
    except OSError as exc:
        reason = (
            f"all {cfg.num_server_rounds} rounds finished and the checkpoint holds them, but final.npz and "
            f"result.json cannot be written to {run_dir}: {exc.strerror or exc} [{type(exc).__name__}]"
        )
        log(ERROR, "FedPrime run FAILED: %s", reason)
        with contextlib.suppress(OSError, ValueError):
            mark_failed(run_dir, reason)
        raise RunFailed(reason) from exc
    if not any(c.get("state") in ("training", "lost") for c in strategy.clients.values()):
        log(WARNING, "no client update was accepted in this run")
    log(INFO, "FedPrime finished. Results: %s (summary.md, metrics.csv, curves.png, final.npz)", run_dir)
    summary = run_dir / "summary.md"
    if summary.is_file():
        for line in summary.read_text().splitlines():
            log(INFO, "%s", line)


def ray_address() -> str | None:
    """The address Ray's processes listen on when this is a simulation whose Ray is not on loopback, else ``None``.

    On Linux Ray binds its servers to every interface of the machine (and its agents to its
    external address) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` was set for ``flwr run``.
    """
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return None
        address = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - a check that must never stop a run
        return None
    return None if address in ("127.0.0.1", "localhost", "::1") else str(address)


def save_result(run_dir: Path, result: Result) -> None:
    """Write the strategy's :class:`~flwr.serverapp.strategy.result.Result` with the run's results.

    ``final.npz``: its arrays, the final global trainable state (prompts, keys, query maps,
    pooler, head; load with ``fedprime_core.method.model.load_trainable_state``). ``result.json``:
    its metric records per round, as the strategy aggregated them (client-side train and
    evaluate metrics, server-side evaluation), for the rounds this process ran.
    """
    atomic_write(run_dir / "final.npz", lambda handle: np.savez(handle, **record_to_state(result.arrays)))

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
