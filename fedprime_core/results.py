"""Results a user can open: per-round JSON/CSV, a PNG of the curves, a markdown table, checkpoints.

Layout of ``<results-dir>/<run-name>/``::

    config.json       the validated run configuration (kebab-case keys)
    metrics.json      one record per completed round (+ the initial evaluation as round 0)
    metrics.csv       the same, one row per round
    clients.json      per client: missing mixture, realised pattern counts, samples
    curves.png        train loss, accuracy per test setting, pool sizes, and how much a sample's
                      missing pattern tells which inter cluster it retrieves, per round
    summary.md        the paper-layout table: final round and best-validation round (and the
                      clients' own test sets, where they evaluated), the same with the tau most
                      popular inter centres, the clients' evaluation per client, the bytes the
                      run sent and received per round and per client (and, for a run that
                      stopped, that it failed and why)
    summary.json      the same numbers, machine-readable, with ``status`` and ``reason``
    checkpoint.json   the commit point: round, history, clients, personal inter pools, and the
                      name and SHA-256 of the array file that belongs to them
    checkpoint-<round>.npz  global trainable state after that round
    run.lock          present while a ServerApp writes the folder (pid and host inside)

Every file is written to a temporary name and renamed into place, so a reader never sees
half a file; files get the permissions of any file the user creates (the umask applies).

A checkpoint has one commit point: the arrays go to a new ``checkpoint-<round>.npz``
(written, flushed to disk, renamed), then ``checkpoint.json``, which names that file and its
hash, replaces the previous one in one rename; only then are older array files removed.
A crash at any moment leaves either the previous round's checkpoint or the new one, never
the metadata of one round with the arrays of another.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_bytes
from .config import OPTIONS, PROFILE_VALUES, RESUMABLE_KEYS
from .data.missing import TEST_SETTINGS
from .metrics import CLIENT_TEST_PREFIX

CHECKPOINT_META = "checkpoint.json"
#: Array files of older versions (one fixed name, written before the metadata).
LEGACY_CHECKPOINT_ARRAYS = "checkpoint.npz"
_ARRAYS_NAME = re.compile(r"^checkpoint-(\d+)\.npz$")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(_jsonable(data), indent=2, sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())


def checkpoint_arrays_name(server_round: int) -> str:
    """The array file of the checkpoint after ``server_round``."""
    return f"checkpoint-{server_round:06d}.npz"


def save_checkpoint(run_dir: Path, state: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Commit the global state and its metadata (``round``, ``history``, ``inter-pool``, ...) as one checkpoint.

    Steps: (1) the arrays to ``checkpoint-<round>.npz`` (temporary file, fsync, rename);
    (2) ``checkpoint.json`` with the array file's name and SHA-256 (temporary file,
    fsync, rename): this rename is the commit point; (3) array files no committed
    checkpoint names, and temporary files of a write that was killed, are removed (the
    run folder's lock guarantees no other writer). A crash before (2) leaves the previous
    checkpoint, one after it the new one.
    """
    run_dir = Path(run_dir)
    name = checkpoint_arrays_name(int(meta["round"]))
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in state.items()})
    blob = buffer.getvalue()
    atomic_write(run_dir / name, lambda h: h.write(blob), durable=True)
    committed = {**meta, "arrays-file": name, "arrays-sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(_jsonable(committed), indent=2)
    atomic_write(run_dir / CHECKPOINT_META, lambda h: h.write(text.encode()), durable=True)
    try:  # committed: what follows is tidying, and a failure here loses nothing
        for old in run_dir.iterdir():
            stale_array = old.name != name and (_ARRAYS_NAME.match(old.name) or old.name == LEGACY_CHECKPOINT_ARRAYS)
            if stale_array or old.name.startswith((".checkpoint-", f".{CHECKPOINT_META}.")):  # left by a killed write
                old.unlink(missing_ok=True)
    except OSError:
        pass


def checkpoint_arrays_path(run_dir: Path, meta: Mapping[str, Any]) -> Path:
    """The array file a checkpoint's metadata (``checkpoint.json``) commits, present or not."""
    return run_dir / str(meta.get("arrays-file") or LEGACY_CHECKPOINT_ARRAYS)


def find_checkpoint(path: str | Path) -> Path:
    """The run directory holding a checkpoint, given the directory or one of its files."""
    path = Path(path).expanduser()
    run_dir = path.parent if path.is_file() else path
    if not (run_dir / CHECKPOINT_META).is_file():
        raise FileNotFoundError(
            f"resume={str(path)!r}: no {CHECKPOINT_META} there; point resume at a run "
            "folder written by a previous run (results-dir/run-name)"
        )
    return run_dir


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state, meta)`` of the committed checkpoint in a run directory (or given one of its files).

    Raises:
        FileNotFoundError: no ``checkpoint.json``, or the array file it names is gone.
        ValueError: the array file is not the one ``checkpoint.json`` committed (its hash
            or its arrays differ): the folder was changed by something else.
    """
    run_dir = find_checkpoint(path)
    meta_path = run_dir / CHECKPOINT_META
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}); the checkpoint cannot be read") from None
    arrays = checkpoint_arrays_path(run_dir, meta)
    if not arrays.is_file():
        raise FileNotFoundError(f"{meta_path} names the array file {arrays.name}, which is missing from {run_dir}")
    blob = arrays.read_bytes()
    expected = meta.get("arrays-sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        raise ValueError(
            f"checkpoint in {run_dir} is inconsistent: {arrays.name} is not the file {CHECKPOINT_META} committed "
            "(SHA-256 differs); it was changed after the round was saved"
        )
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        state = {k: data[k].astype(np.float32) for k in data.files}
    if meta.get("state-keys") and sorted(meta["state-keys"]) != sorted(state):
        raise ValueError(
            f"checkpoint in {run_dir} is inconsistent: arrays {sorted(state)} vs metadata {meta['state-keys']}"
        )
    return state, meta


def resume_conflicts(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings that may not change on resume and do: ``["'tau' (6 -> 7)", ...]``, sorted by key.

    Args:
        stored: the checkpoint's run config (``checkpoint.json``'s ``config``).
        current: the resumed run's (:func:`~fedprime_core.config.config_to_dict`).

    A checkpoint from before the communication keys existed exchanged what ``comm-profile``
    ``paper`` does; one from before another key computed what that key says runs before it
    did (:attr:`~fedprime_core.config.Option.earlier`); any other key it lacks is not compared.
    Keys that may change on resume (:data:`~fedprime_core.config.RESUMABLE_KEYS`) never conflict.
    """
    previous = {"comm-profile": "paper", **PROFILE_VALUES["paper"], **stored}
    previous.update({opt.key: opt.earlier(stored) for opt in OPTIONS if opt.earlier and opt.key not in stored})
    changed = sorted(k for k, v in current.items() if k not in RESUMABLE_KEYS and k in previous and previous[k] != v)
    return [f"'{k}' ({previous[k]!r} -> {current[k]!r})" for k in changed]


def flatten_round(record: Mapping[str, Any]) -> dict[str, Any]:
    """One flat row per round: nested ``{"eval": {"val": {"accuracy": ..}}}`` -> ``val/accuracy``."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            for sub, inner in flatten_round(value).items():
                row[f"{key}/{sub}" if key != "eval" else sub] = inner
        elif isinstance(value, (list, tuple)):
            row[key] = "; ".join(map(str, value))
        else:
            row[key] = value
    return row


def write_metrics(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.json`` and ``metrics.csv`` of every round so far."""
    run_dir = Path(run_dir)
    write_json(run_dir / "metrics.json", list(history))
    rows = [flatten_round(r) for r in history]
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)

    def write(handle) -> None:
        text = _TextWriter(handle)
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _jsonable(row.get(c, "")) for c in columns})

    atomic_write(run_dir / "metrics.csv", write)


class _TextWriter:
    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, text: str) -> int:
        return self.handle.write(text.encode())


def metric_name(macro_f1: bool) -> str:
    """The headline metric's name from whether it is macro-F1 (:func:`fedprime_core.data.datasets.headline_metric`)."""
    return "macro_f1" if macro_f1 else "accuracy"


def communication_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Bytes the run actually sent and received for training, from the round records.

    Per round: the mean over the training rounds of the arrays sent to all sampled clients
    (``bytes-sent``) and received in their replies (``bytes-received``); per client: the
    mean per message (download) and per reply that carried arrays (upload); totals over
    the rounds. ``None`` before the first training round.
    """
    rounds = [r for r in history if r.get("round", 0) > 0 and "bytes-sent" in r]
    if not rounds:
        return None

    def mean(key: str) -> float:
        values = [float(r[key]) for r in rounds if r.get(key) is not None]
        return float(np.mean(values)) if values else 0.0

    return {
        "rounds": len(rounds),
        "bytes-sent-per-round": mean("bytes-sent"),
        "bytes-received-per-round": mean("bytes-received"),
        "bytes-sent-per-client": mean("bytes-sent-per-client"),
        "bytes-received-per-client": mean("bytes-received-per-client"),
        "bytes-sent-total": int(sum(int(r.get("bytes-sent", 0)) for r in rounds)),
        "bytes-received-total": int(sum(int(r.get("bytes-received", 0)) for r in rounds)),
    }


def alignment_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """How often the inter-prompt alignment did something merging by position would not have.

    ``rounds``: training rounds that aligned inter prompts; ``noop-rounds``: those in which
    the used prompts were grouped exactly as slot index groups them (``inter-align-noop``),
    so the merge equalled the positional one; ``rematched``: used prompts placed in a
    cluster other than their slot's, summed over the rounds. ``None`` without alignment.
    """
    rounds = [r for r in history if r.get("round", 0) > 0 and "inter-align-noop" in r]
    if not rounds:
        return None
    return {
        "rounds": len(rounds),
        "noop-rounds": int(sum(int(r["inter-align-noop"]) for r in rounds)),
        "rematched": int(sum(int(r.get("inter-rematched", 0)) for r in rounds)),
    }


def top_tau_evaluation(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A round's server-side evaluation with the ``tau`` most popular inter centres: its ``eval-top-tau``, or its
    ``eval`` where the round says that is the same model (``eval-top-tau-same``); ``None`` when not evaluated."""
    if record.get("eval-top-tau"):
        return record["eval-top-tau"]
    return record.get("eval") if record.get("eval-top-tau-same") else None


def client_evaluation(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last client-side evaluation: its round, sample-weighted means and per-client metrics (``None``: none)."""
    rounds = [r for r in history if r.get("round", 0) > 0 and r.get("client-eval")]
    if not rounds:
        return None
    last = rounds[-1]
    return {"round": last["round"], "means": last["client-eval"], "per-client": last.get("client-eval-per-client", {})}


def summarise(history: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """Final-round and best-validation-round values of ``metric`` per test setting, and the bytes exchanged.

    The best round is chosen on the held-out validation split, never on the test
    settings (the reference code reports the maximum over rounds of the test metric).
    Each row also holds, where that round has them, ``top-tau`` (the test settings and ``val``
    with the ``tau`` most popular inter centres, ``eval-top-tau``) and ``clients-test``
    (``clients-val``): the sample-weighted mean of ``metric`` over the clients' own test sets
    (validation splits), each client evaluating the state it uses.
    ``communication``: :func:`communication_summary`; ``client-eval``: :func:`client_evaluation`.
    """
    communication = communication_summary(history)
    alignment = alignment_summary(history)
    extra = {"alignment": alignment} if alignment else {}
    clients = client_evaluation(history)
    evaluated = [r for r in history if r.get("eval") and r["round"] > 0]
    if not evaluated:
        return {
            "metric": metric,
            "final": None,
            "best": None,
            "communication": communication,
            "client-eval": clients,
            **extra,
        }

    def settings(evaluation: Mapping[str, Any]) -> dict[str, Any]:
        return {s: evaluation.get(s, {}).get(metric) for s in ("val", *TEST_SETTINGS)}

    def pick(record: Mapping[str, Any]) -> dict[str, Any]:
        row = {"round": record["round"], **settings(record["eval"])}
        top = top_tau_evaluation(record)
        if top:
            row["top-tau"] = settings(top)
            row["top-tau-same"] = bool(record.get("eval-top-tau-same"))
        means = record.get("client-eval") or {}
        for key, name in ((CLIENT_TEST_PREFIX + metric, "clients-test"), (metric, "clients-val")):
            if key in means:
                row[name] = means[key]
        return row

    best = max(evaluated, key=lambda r: (r["eval"].get("val", {}).get(metric) or -1.0, -r["round"]))
    return {
        "metric": metric,
        "final": pick(evaluated[-1]),
        "best": pick(best),
        "communication": communication,
        "client-eval": clients,
        **extra,
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def summary_markdown(summary: Mapping[str, Any], title: str) -> str:
    """The paper's table layout (columns: the five test settings), in percent; then the same with the ``tau``
    most popular inter centres, and the clients' own evaluation."""
    rows = [(label, summary.get(label)) for label in ("final", "best") if summary.get(label) is not None]
    with_clients = any("clients-test" in row for _, row in rows)
    header = "| round | " + " | ".join(TEST_SETTINGS) + " | val |" + (" clients' own test |" if with_clients else "")
    rule = "|---" * (len(TEST_SETTINGS) + 2 + with_clients) + "|"
    lines = [
        f"# {title}",
        "",
        f"Metric: {summary['metric']} (%), server-side evaluation of the global model on held-out data"
        + (
            "; clients' own test: the sample-weighted mean over the clients, each scoring the state it uses on "
            "its own test set (client-side evaluation)."
            if with_clients
            else "."
        ),
        "",
        header,
        rule,
    ]
    if not rows:
        lines[2:] = [
            "No server-side evaluation so far (server-eval=false, or the server holds no data-dir); clients' own "
            "scores: `client-eval` and `client-eval-per-client` in metrics.json."
        ]
    for label, row in rows:
        name = "final" if label == "final" else "best val"
        cells = " | ".join(_fmt(row.get(s)) for s in TEST_SETTINGS)
        own = f" {_fmt(row.get('clients-test'))} |" if with_clients else ""
        lines.append(f"| {name} (round {row['round']}) | {cells} | {_fmt(row.get('val'))} |{own}")
    top = [(label, row) for label, row in rows if row.get("top-tau")]
    if any(not row["top-tau-same"] for _, row in top):
        lines += [
            "",
            "The same global model with only the tau most popular inter centres (what a new client starts from; "
            "the same pool size for every inter-merge):",
            "",
            "| round | " + " | ".join(TEST_SETTINGS) + " | val |",
            "|---" * (len(TEST_SETTINGS) + 2) + "|",
        ]
        for label, row in top:
            name = "final" if label == "final" else "best val (chosen on the whole pool)"
            cells = " | ".join(_fmt(row["top-tau"].get(s)) for s in TEST_SETTINGS)
            lines.append(f"| {name} (round {row['round']}) | {cells} | {_fmt(row['top-tau'].get('val'))} |")
    clients = summary.get("client-eval")
    if clients:
        metric = summary["metric"]
        means = clients["means"]
        tested = int(means.get(CLIENT_TEST_PREFIX + "num-examples", 0))
        own_test = (
            f"{_fmt(means.get(CLIENT_TEST_PREFIX + metric))} on the clients' own test sets ({tested} samples), "
            if tested
            else "(no client has a test set of its own), "
        )
        lines += [
            "",
            f"Client-side evaluation, round {clients['round']}: each client scores the state it uses (its own inter "
            f"pool where the method keeps one). Sample-weighted mean {metric}: {own_test}"
            f"{_fmt(means.get(metric))} on their validation splits ({int(means.get('num-examples', 0))} samples).",
            "",
            "| client | own test samples | own test | validation samples | validation |",
            "|---|---|---|---|---|",
        ]
        for client, values in clients["per-client"].items():
            lines.append(
                f"| {client} | {int(values.get(CLIENT_TEST_PREFIX + 'num-examples', 0))} | "
                f"{_fmt(values.get(CLIENT_TEST_PREFIX + metric))} | {int(values.get('num-examples', 0))} | "
                f"{_fmt(values.get(metric))} |"
            )
    comm = summary.get("communication")
    if comm:
        lines += [
            "",
            f"Communication{f' ({wire})' if (wire := summary.get('wire')) else ''}: per training round "
            f"{comm['bytes-sent-per-round'] / 1e6:.3f} MB sent, {comm['bytes-received-per-round'] / 1e6:.3f} MB "
            f"received; per client {comm['bytes-sent-per-client'] / 1e6:.3f} MB down, "
            f"{comm['bytes-received-per-client'] / 1e6:.3f} MB up; {comm['bytes-sent-total'] / 1e6:.2f} MB sent and "
            f"{comm['bytes-received-total'] / 1e6:.2f} MB received in {comm['rounds']} round(s) "
            "(arrays only, MB = 10^6 bytes).",
        ]
    alignment = summary.get("alignment")
    if alignment:
        lines += [
            "",
            f"Alignment: the alignment changed nothing in {alignment['noop-rounds']} of {alignment['rounds']} "
            "round(s) (the used inter prompts were grouped by slot, so the merge equalled merging by position); "
            f"{alignment['rematched']} used prompt(s) re-matched to another cluster in all.",
        ]
    return "\n".join(lines) + "\n"


#: What a client's ``state`` in clients.json means, for the summary's table.
CLIENT_STATES = {
    "training": "training",
    "checked": "checked, not trained yet",
    "refused": "refused",
    "lost": "lost",
}


def clients_markdown(clients: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """The summary's table of every client: its state, data, counted missing rows and its own validation score.

    ``state`` is ``training`` (its last update was accepted), ``refused`` (its data check failed
    before it was first sampled: the reason), ``lost`` (it trained, then failed or went silent:
    the round and the reason) or ``checked`` (its data was checked; it has not trained yet).
    """
    if not clients:
        return ""
    lines = [
        "## Clients",
        "",
        f"| client | state | data | train / val rows | complete / text-missing / image-missing | client val {metric} |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(clients, key=_client_key):
        info = clients[name]
        state = str(info.get("state", "training"))
        shown = CLIENT_STATES.get(state, state)
        if state == "refused":
            shown += f": {info.get('reason', '')}"
        elif state == "lost":
            shown += f" at round {info.get('lost-round', '?')}: {info.get('reason', '')}"
        elif "last-round" in info:
            shown += f" (last round {info['last-round']})"
        rows = f"{info['num-train']} / {info['num-val']}" if "num-train" in info and "num-val" in info else "-"
        counts = (
            " / ".join(str(info[k]) for k in ("complete", "text-missing", "image-missing"))
            if all(k in info for k in ("complete", "text-missing", "image-missing"))
            else "-"
        )
        val = info.get("client-val") or {}
        score = f"{_fmt(val.get(metric))} (round {val['round']})" if metric in val and "round" in val else "-"
        cells = [str(name), shown.replace("|", "/"), str(info.get("data", "-")), rows, counts, score]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _client_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def plot_curves(run_dir: Path, history: Sequence[Mapping[str, Any]], metric: str, title: str) -> Path | None:
    """``curves.png``: train loss, ``metric`` per test setting, pool sizes, and inter-prompt specialisation per round.

    The last panel (methods with an inter pool that report pattern usage) shows the mutual
    information between a sample's missing pattern and the inter cluster it retrieves, its
    upper bound (the pattern entropy), and the share of clusters one pattern dominates.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional; the JSON/CSV hold every number
        return None
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in history if r["round"] > 0]
    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    axes = grid.ravel()

    def percent(value: Any) -> float | None:
        return None if value is None else 100.0 * float(value)

    axes[0].plot(rounds, [r.get("train-loss") for r in history if r["round"] > 0], marker="o")
    axes[0].set(title="train loss", xlabel="round")
    evaluated = [r for r in history if r.get("eval")]
    for setting in ("val", *TEST_SETTINGS):
        xs = [r["round"] for r in evaluated if setting in r["eval"]]
        ys = [percent(r["eval"][setting].get(metric)) for r in evaluated if setting in r["eval"]]
        if xs:
            axes[1].plot(xs, ys, marker="o", ms=4, label=setting)
    separate = [r for r in evaluated if r.get("eval-top-tau-same") is False]
    if separate:
        ys = [percent(r["eval-top-tau"].get("val", {}).get(metric)) for r in separate]
        axes[1].plot([r["round"] for r in separate], ys, ls="--", marker=".", label="val, top-tau centres")
    clients = [r for r in history if r.get("client-eval", {}).get(CLIENT_TEST_PREFIX + metric) is not None]
    if clients:
        ys = [percent(r["client-eval"][CLIENT_TEST_PREFIX + metric]) for r in clients]
        axes[1].plot([r["round"] for r in clients], ys, ls=":", lw=2, marker="x", label="clients' own test (mean)")
    axes[1].set(title=f"{metric} (%): server-side, and the clients' own test sets", xlabel="round", ylabel="%")
    styles = {"intra": dict(marker="o", ls="-"), "inter": dict(marker="s", ls="--")}  # both visible when equal
    largest = 0
    for pool in ("intra", "inter"):
        ys = [r.get(f"{pool}-pool-size") for r in history if r["round"] > 0]
        if any(y is not None for y in ys):
            axes[2].plot(rounds, ys, label=pool, **styles[pool])
            largest = max([largest, *(y for y in ys if y is not None)])
    axes[2].set_ylim(0, largest * 1.15 + 1)  # from zero: a constant pool is a flat line, not a zoomed wobble
    axes[2].set(title="prompt pool size (global)", xlabel="round", ylabel="prompts")
    axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    trained = [r for r in history if r["round"] > 0 and "inter-specialisation-bits" in r]
    if trained:
        xs = [r["round"] for r in trained]
        axes[3].plot(xs, [r["inter-specialisation-bits"] for r in trained], marker="o", label="I(pattern; cluster)")
        axes[3].plot(xs, [r["inter-pattern-entropy-bits"] for r in trained], ls="--", label="H(pattern)")
        share = axes[3].twinx()
        share.plot(xs, [r["inter-specialised-share"] for r in trained], color="tab:green", marker=".")
        share.set_ylabel("share of clusters >80% one pattern", color="tab:green")
        share.set_ylim(0, 1)
    axes[3].set(title="inter prompts: specialisation on missing patterns", xlabel="round", ylabel="bits")
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        axis.grid(alpha=0.3)
    for axis in axes[1:]:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_run_outputs(
    run_dir: Path,
    history: Sequence[Mapping[str, Any]],
    multilabel: bool,
    title: str,
    status: str = "running",
    reason: str = "",
    wire: str = "",
    clients: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write metrics.json/csv, summary.md/json and curves.png for the rounds so far.

    Args:
        status: ``running`` (more rounds to come), ``finished`` or ``failed``; a failed
            run's summary says so, after which round, and ``reason``.
        wire: a line describing what travels (``comm-profile`` and its keys), shown with
            the communication figures.
        clients: the clients.json records; summary.md lists every client with its state
            (:func:`clients_markdown`).
    """
    run_dir = Path(run_dir)
    write_metrics(run_dir, history)
    summary = summarise(history, metric_name(multilabel))
    summary = {"status": status, **({"reason": reason} if reason else {}), **summary}
    if wire:
        summary["wire"] = wire
    write_json(run_dir / "summary.json", summary)
    text = summary_markdown(summary, title)
    if clients:
        text += "\n" + clients_markdown(clients, metric_name(multilabel))
    if status == "failed":
        last = max((r["round"] for r in history), default=None)
        when = "before round 1" if last is None else f"after round {last}"
        header, _, rest = text.partition("\n\n")
        text = f"{header}\n\n**Run failed {when}:** {reason}\n\n{rest}"
    atomic_write_bytes(run_dir / "summary.md", text.encode())
    plot_curves(run_dir, history, metric_name(multilabel), title)
    return summary


def mark_failed(run_dir: Path, reason: str) -> None:
    """Mark the summary of a run whose ServerApp is gone as ``failed`` with ``reason``.

    ``summary.json`` gets ``status: failed`` and the reason; ``summary.md`` the reason under its
    title. Everything else (metrics, checkpoint) stays as the last completed round left it.
    """
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary = {
        "status": "failed",
        "reason": reason,
        **{k: v for k, v in summary.items() if k not in ("status", "reason")},
    }
    write_json(path, summary)
    markdown = run_dir / "summary.md"
    if markdown.is_file():
        header, _, rest = markdown.read_text().partition("\n\n")
        atomic_write_bytes(markdown, f"{header}\n\n**Run failed:** {reason}\n\n{rest}".encode())
