"""An experiment grid file read into a :class:`Plan`: its cells, tables and output folder (format: the
package docstring)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

from ...config import (
    OPTIONS_BY_KEY,
    RESUMABLE_KEYS,
    ConfigError,
    RunConfig,
    config_to_dict,
    parse_run_config,
    stored_value,
)
from ...data.datasets import headline_metric
from ...data.missing import TEST_SETTINGS
from ...results import CHECKPOINT_META, checkpoint_arrays_path
from ...yamlio import read_yaml_mapping
from ..launch import APP_DIR

#: Run-config keys naming files or folders: a relative value is relative to the grid file's folder.
PATH_KEYS = ("missing-table", "data-dir")
_CELL_KEYS = ("method", "missing-setting", "eta", "seed")
#: Run-config keys that say where a run's files go, not what it computes.
BOOKKEEPING_KEYS = ("run-name", "results-dir", "resume")
#: Every other run-config key at its default value.
DEFAULTS: dict[str, Any] = {k: v for k, v in config_to_dict(RunConfig()).items() if k not in BOOKKEEPING_KEYS}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One federation of the grid."""

    name: str
    config: dict[str, Any]
    grids: tuple[str, ...]

    @property
    def label(self) -> dict[str, Any]:
        return {k: self.config[k] for k in _CELL_KEYS}


def by_seed(cells: Sequence[Cell]) -> tuple[Cell, ...]:
    """``cells`` ordered by seed, the grid's order kept within a seed.

    A study that runs over several sessions then finishes whole seeds, every arm of seed 3
    before any of seed 4, so that what an interruption leaves holds complete pairs.
    """
    return tuple(sorted(cells, key=lambda cell: cell.config.get("seed", 0)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A parsed grid file."""

    name: str
    output: Path
    federation: dict[str, Any]
    cells: tuple[Cell, ...]
    metric: str
    base_dir: Path = Path(".")
    tables: tuple[TableSpec, ...] = ()
    reuse: tuple[Path, ...] = ()
    """Other grids' output folders whose finished runs stand for this grid's identical cells."""
    blind: bool = False
    """Read blind until complete: no tables or plots while any cell is unfinished (:func:`unfinished_cells`)."""

    @property
    def runs_dir(self) -> Path:
        return self.output / "runs"

    def reused_from(self, cell: Cell) -> Path | None:
        """The run folder of another grid's output (``reuse``) that stands for ``cell``, if one does.

        One does when this grid has no folder of its own for the cell, and a ``reuse`` output
        holds a *finished* run of the same name (its checkpoint reached the cell's
        ``num-server-rounds``) made with the cell's settings (:func:`stale_settings` is empty).
        The first such output in the order written wins. A partial run there is never
        reused (its own grid may still be running it), nor written to: the cell runs here.
        """
        if not self.reuse or (self.runs_dir / cell.name).exists():
            return None
        for output in self.reuse:
            folder = output / "runs" / cell.name
            done = completed_rounds(folder)
            if done is None or done < int(cell.config["num-server-rounds"]):
                continue
            try:
                stored = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(stored, dict) and not stale_settings(cell.config, stored):
                return folder
        return None

    def run_dir(self, cell: Cell) -> Path:
        """Where ``cell``'s run is read from: a reused finished run (:meth:`reused_from`), else its own folder."""
        return self.reused_from(cell) or self.runs_dir / cell.name

    def resolve_paths(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` with relative file settings made absolute against the grid file's folder.

        Cells are named and hashed with the values as written, so a grid gives the same cell
        names in every checkout.
        """
        out = dict(config)
        for key in PATH_KEYS:
            value = out.get(key)
            if value and not Path(value).expanduser().is_absolute():
                out[key] = str((self.base_dir / value).resolve())
        return out


@dataclasses.dataclass(frozen=True)
class ExtraColumn:
    """A column computed from the rounds of each run's ``metrics.json`` (see the module docstring)."""

    key: str
    per: str | None = None
    over: str = "mean"
    scale: float = 1.0
    label: str = ""
    #: A ``client-eval/<metric>`` column over these client ids only: each round's sample-weighted mean
    #: of the clients' own ``<metric>`` (``client-eval-per-client``), ``None`` in a round that lacks one
    #: of them. ``None``: the round's value as recorded (every client).
    clients: tuple[str, ...] | None = None

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        base = f"{self.key} / {self.per}" if self.per else self.key
        if self.clients is not None:
            base += f" of clients {', '.join(self.clients)}"
        return f"{base} ({self.over})"


@dataclasses.dataclass(frozen=True)
class Difference:
    """Paired difference ``key: value`` minus ``key: minus``, matched on every other key.

    ``key``, ``value`` and ``minus`` may also be equal-length tuples: the runs having every
    ``key[i] = value[i]`` minus their twins with every ``key[i] = minus[i]`` (two factors changed
    at once, e.g. the reference's settings against ours).
    """

    key: str | tuple[str, ...]
    value: Any
    minus: Any

    @property
    def keys(self) -> tuple[str, ...]:
        return self.key if isinstance(self.key, tuple) else (self.key,)

    def _side(self, side: Any) -> dict[str, Any]:
        return dict(zip(self.keys, side if isinstance(self.key, tuple) else (side,)))

    @property
    def values(self) -> dict[str, Any]:
        """``{key: value}`` of the first arm."""
        return self._side(self.value)

    @property
    def minuses(self) -> dict[str, Any]:
        """``{key: value}`` of the arm subtracted."""
        return self._side(self.minus)

    def arm(self, values: Mapping[str, Any]) -> str:
        return ", ".join(f"{k} = {v}" for k, v in values.items())

    @property
    def title(self) -> str:
        """``key = value minus key = minus`` (every key of a multi-key difference)."""
        return f"{self.arm(self.values)} minus {self.arm(self.minuses)}"

    @property
    def short(self) -> str:
        """``value - minus`` (values joined by ``,`` for several keys)."""
        join = ",".join
        return f"{join(str(v) for v in self.values.values())} - {join(str(v) for v in self.minuses.values())}"


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A comparison table over named sub-grids (see the module docstring)."""

    name: str
    grids: tuple[str, ...]
    round: str = "final"
    extra: tuple[ExtraColumn, ...] = ()
    differences: tuple[Difference, ...] = ()
    axes: tuple[str, ...] = ()  # the sub-grids' keys, in the order written, to order the row keys
    primary: str | None = None
    """The column the differences are tested on (paired t, Holm over the table's difference rows)."""
    pool: tuple[str, ...] = ()
    """Run-config keys the table does not split rows by: a row (and a difference row) holds runs at
    every value of them, while each pair still holds both arms at one value (the twin is matched on
    every key). For settings that change rounding only, e.g. ``text-padding`` across a study's seeds."""
    level_off: float | None = None
    """The levelling-off threshold of the primary column, in its units: an arm whose mean per-run gain
    between the last two rounds that recorded the column is under it has levelled off
    (:func:`~.report.levelling`). Needs ``primary`` to be an ``over: final`` extra column."""
    margin: float | None = None
    """The smallest difference of practical interest on the primary column, in its units: each test
    row gets a verdict by the reading rule of :func:`~.report.verdict`. Needs ``primary``."""


def cell_name(config: Mapping[str, Any]) -> str:
    """Readable, unique name: method-setting-eta-seed plus a hash of the settings that are not defaults.

    Only values that differ from :data:`DEFAULTS` enter the hash, so an option added to the
    configuration later (at its default) leaves every cell's name, and the run folder it
    names, as it was. A default that changes under a finished run is caught when the run
    would be reused (:func:`stale_settings`).
    """
    changed = {k: v for k, v in config.items() if k not in DEFAULTS or v != DEFAULTS[k]}
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    eta = f"{float(config['eta']):g}".replace(".", "p")
    return f"{config['method']}-{config['missing-setting']}-eta{eta}-s{config['seed']}-{digest}"


def stale_settings(config: Mapping[str, Any], stored: Mapping[str, Any]) -> list[str]:
    """The settings in which a cell's configuration and the ``config.json`` of its run folder differ.

    ``["'lr' (0.05 in the run folder, 0.1 in the grid)", ...]``; empty when the run folder may
    stand for the cell. Keys that may change when a run is resumed are not compared (a
    larger ``num-server-rounds`` resumes the run), nor file paths (a results folder may come
    from another checkout); a key the run folder lacks (an option added since) counts as what
    runs before it did (:func:`~fedprime_core.config.stored_value`: its default, unless the
    option says otherwise, as ``pfpt-steps`` does for pfpt runs).
    """
    out = []
    for key, value in config.items():
        if key in BOOKKEEPING_KEYS or key in RESUMABLE_KEYS or key in PATH_KEYS:
            continue
        before = stored_value(stored, key) if key in OPTIONS_BY_KEY else stored.get(key, DEFAULTS.get(key))
        if before != value:
            out.append(f"{key!r} ({before!r} in the run folder, {value!r} in the grid)")
    return out


def folder_settings_changed(plan: Plan, cell: Cell) -> list[str]:
    """:func:`stale_settings` of the cell against its run folder's ``config.json`` (none without one)."""
    try:
        stored = json.loads((plan.run_dir(cell) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    return stale_settings(cell.config, stored)


def _checkpoint_meta(run_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((run_dir / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def completed_rounds(run_dir: Path) -> int | None:
    """The rounds a run folder's checkpoint holds; ``None`` without a readable ``checkpoint.json``."""
    meta = _checkpoint_meta(run_dir)
    try:
        return None if meta is None else int(meta.get("round", 0))
    except (TypeError, ValueError):
        return None


def missing_checkpoint_arrays(run_dir: Path) -> str | None:
    """The name of the array file a run folder's ``checkpoint.json`` commits, if that file is absent.

    ``None`` when there is no readable checkpoint or its arrays are there. A folder copied or
    committed without its arrays (they are the large part of a checkpoint) still says how many
    rounds it finished, which is all a finished cell needs; a partial one cannot resume from it.
    """
    meta = _checkpoint_meta(run_dir)
    if meta is None:
        return None
    arrays = checkpoint_arrays_path(run_dir, meta)
    return None if arrays.is_file() else arrays.name


def resumable_folder(plan: Plan, cell: Cell) -> tuple[Path | None, list[Path]]:
    """A run folder of ``plan`` that ``cell`` may resume although its name differs: ``(folder, candidates)``.

    A cell's name hashes every setting that is not a default, so raising ``num-server-rounds``
    (or another resumable key, such as ``eval-every``) in a grid renames its cells. The runs
    made under the old value are still the same runs, up to the rounds they finished: a folder
    qualifies when its name has the cell's readable prefix (method, setting, eta, seed), no cell
    of the plan is named like it, its ``config.json`` differs from the cell's configuration in
    resumable keys and file paths only (:func:`stale_settings` is empty) and its checkpoint holds
    no more rounds than the cell asks for. ``folder`` is the one candidate, or ``None`` when the
    cell has a folder of its own, when there is none, or when there are several (ambiguous:
    ``candidates`` names them, and nothing is adopted).
    """
    if (plan.runs_dir / cell.name).exists() or not plan.runs_dir.is_dir() or plan.reused_from(cell) is not None:
        return None, []
    prefix = cell.name.rsplit("-", 1)[0] + "-"
    named = {c.name for c in plan.cells}
    candidates = []
    for folder in sorted(plan.runs_dir.glob(prefix + "*")):
        if folder.name in named or not folder.is_dir() or folder.name.rsplit("-", 1)[0] + "-" != prefix:
            continue
        done = completed_rounds(folder)
        try:
            stored = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if done is None or not isinstance(stored, dict):
            continue
        if not stale_settings(cell.config, stored) and done <= int(cell.config["num-server-rounds"]):
            candidates.append(folder)
    return (candidates[0] if len(candidates) == 1 else None), candidates


def rounds_left(plan: Plan, cell: Cell) -> int:
    """The rounds ``cell``'s run (its own, or a reused one) has still to run before its ``num-server-rounds``."""
    return max(0, int(cell.config["num-server-rounds"]) - (completed_rounds(plan.run_dir(cell)) or 0))


def unfinished_cells(plan: Plan) -> list[Cell]:
    """The plan's cells with rounds left to run (:func:`rounds_left`)."""
    return [cell for cell in plan.cells if rounds_left(plan, cell)]


def blind_cells_left(plan: Plan) -> list[Cell]:
    """The unfinished cells that keep a ``blind`` grid's tables closed; none for a grid that is not blind."""
    return unfinished_cells(plan) if plan.blind else []


def _seconds_per_round(run_dir: Path) -> float | None:
    """Mean wall seconds of a run's rounds (its ``metrics.json`` ``round-seconds``); ``None`` without any."""
    try:
        history = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(history, list):
        return None
    seconds = [
        float(r["round-seconds"])
        for r in history
        if isinstance(r, dict) and isinstance(r.get("round-seconds"), (int, float)) and r.get("round", 0) > 0
    ]
    return sum(seconds) / len(seconds) if seconds else None


def estimate_remaining(plan: Plan, cells: Sequence[Cell] | None = None) -> dict[str, Any]:
    """How long the unfinished cells among ``cells`` (default: all) take, from the rounds the finished cells took.

    Each unfinished cell costs its rounds still to run times the median seconds per round of
    the finished runs of its arm (every setting but the seed the same), or, without one, of
    its method. Round wall time only (a cell's start-up of a minute or so is not in it), on
    whatever machine and load the finished runs had. Reads no result but ``round-seconds``.

    Returns:
        ``{"cells": unfinished cells, "seconds": the estimate over the cells it covers,
        "unknown": cells of a method without any finished run}``.
    """
    by_arm: dict[str, list[float]] = {}
    by_method: dict[str, list[float]] = {}
    unfinished: list[tuple[Cell, int]] = []
    wanted = {c.name for c in (plan.cells if cells is None else cells)}
    for cell in plan.cells:
        left = rounds_left(plan, cell)
        if left:
            if cell.name in wanted:
                unfinished.append((cell, left))
            continue
        per_round = _seconds_per_round(plan.run_dir(cell))
        if per_round is not None:
            by_arm.setdefault(_arm(cell), []).append(per_round)
            by_method.setdefault(cell.config["method"], []).append(per_round)
    seconds, unknown = 0.0, 0
    for cell, left in unfinished:
        measured = by_arm.get(_arm(cell)) or by_method.get(cell.config["method"])
        if measured:
            seconds += left * median(measured)
        else:
            unknown += 1
    return {"cells": len(unfinished), "seconds": seconds, "unknown": unknown}


def _arm(cell: Cell) -> str:
    return json.dumps({k: v for k, v in cell.config.items() if k != "seed"}, sort_keys=True)


def load_plan(path: str | Path) -> Plan:
    """Parse and validate a grid file; every cell's configuration is checked up front.

    Raises:
        ConfigError: naming the file, sub-grid and key that is wrong.
    """
    path = Path(path)
    spec = read_yaml_mapping(path, "grid file", ConfigError)
    unknown = set(spec) - {"name", "output", "federation", "base", "grids", "description", "tables", "reuse", "blind"}
    if unknown:
        raise ConfigError(f"grid file {path}: unknown top-level key(s) {sorted(unknown)}")
    if not isinstance(spec.get("grids"), dict) or not spec["grids"]:
        raise ConfigError(f"grid file {path}: 'grids' must map sub-grid names to key lists")
    name = str(spec.get("name") or path.stem)
    output = Path(spec.get("output") or f"results/experiments/{name}")
    output = output if output.is_absolute() else APP_DIR / output
    reuse = _parse_reuse(path, spec.get("reuse"), output)
    blind = spec.get("blind", False)
    if not isinstance(blind, bool):
        raise ConfigError(f"grid file {path}: 'blind' must be true or false, got {blind!r}")
    base = dict(spec.get("base") or {})
    cells: dict[str, Cell] = {}
    for grid_name, axes in spec["grids"].items():
        if not isinstance(axes, dict):
            raise ConfigError(f"grid file {path}: sub-grid {grid_name!r} must map run-config keys to values")
        keys = list(axes)
        values = [v if isinstance(v, list) else [v] for v in axes.values()]
        for combo in itertools.product(*values):
            overrides = {**base, **dict(zip(keys, combo))}
            overrides.pop("run-name", None)
            overrides.pop("results-dir", None)
            overrides.pop("resume", None)
            try:
                config = config_to_dict(parse_run_config(overrides))
            except ConfigError as exc:
                raise ConfigError(
                    f"grid file {path}, sub-grid {grid_name!r}, cell {dict(zip(keys, combo))}: {exc}"
                ) from None
            for key in BOOKKEEPING_KEYS:
                config.pop(key)
            cname = cell_name(config)
            previous = cells.get(cname)
            grids = (*previous.grids, grid_name) if previous else (grid_name,)
            cells[cname] = Cell(cname, config, grids)
    datasets = {c.config["dataset"] for c in cells.values()}
    headline = {headline_metric(dataset) for dataset in datasets}
    metric = headline.pop() if len(headline) == 1 else "accuracy"  # a mixed grid: accuracy, which every set has
    tables = _parse_tables(path, spec.get("tables"), spec["grids"], tuple(cells.values()))
    return Plan(
        name,
        output,
        dict(spec.get("federation") or {}),
        tuple(cells.values()),
        metric,
        path.parent.resolve(),
        tables,
        reuse,
        blind,
    )


def _parse_reuse(path: Path, raw: Any, output: Path) -> tuple[Path, ...]:
    """The ``reuse`` list: other grids' output folders (relative ones as ``output`` is), each existing."""
    if raw is None:
        return ()
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(
            f"grid file {path}: 'reuse' must list other grids' output folders, e.g. "
            f"[experiments/fashion-study-results], got {raw!r}"
        )
    folders = []
    for entry in entries:
        folder = Path(entry).expanduser()
        folder = folder if folder.is_absolute() else APP_DIR / folder
        if folder.resolve() == output.resolve():
            raise ConfigError(f"grid file {path}: 'reuse' names this grid's own output {entry!r}")
        if not (folder / "runs").is_dir():
            raise ConfigError(
                f"grid file {path}: 'reuse' folder {entry!r} has no runs/ folder ({folder / 'runs'}); "
                "name the 'output' of the grid whose runs this one shares"
            )
        folders.append(folder)
    return tuple(folders)


_TABLE_KEYS = {"grids", "round", "extra", "differences", "primary", "pool", "level-off", "margin"}
_EXTRA_KEYS = {"key", "per", "over", "scale", "label", "clients"}
_OVER = ("mean", "final", "sum", "max", "min")
#: A table's metric columns (the run's summary): each test setting, then val; a comparison table's extra
#: columns come after them.
TEST_COLUMNS = (*TEST_SETTINGS, "val")


def _parse_tables(path: Path, raw: Any, grids: Mapping[str, Any], cells: tuple[Cell, ...]) -> tuple[TableSpec, ...]:
    """Validate the ``tables`` section against the sub-grids and cells it refers to."""
    from ...config import OPTIONS

    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"grid file {path}: 'tables' must map table names to table specs")
    option_keys = {opt.key for opt in OPTIONS}
    tables = []
    for name, body in raw.items():
        where = f"grid file {path}, table {name!r}"
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: must be a mapping with keys {sorted(_TABLE_KEYS)}")
        unknown = set(body) - _TABLE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use {sorted(_TABLE_KEYS)}")
        names = body.get("grids", [name])
        names = [names] if isinstance(names, str) else list(names)
        missing = [g for g in names if g not in grids]
        if not names or missing:
            raise ConfigError(f"{where}: no sub-grid named {missing or names}; the grid file has {sorted(grids)}")
        which = body.get("round", "final")
        if which not in ("final", "best"):
            raise ConfigError(f"{where}: 'round' must be 'final' or 'best', got {which!r}")
        extras = []
        for item in body.get("extra") or []:
            if not isinstance(item, dict) or "key" not in item or set(item) - _EXTRA_KEYS:
                raise ConfigError(
                    f"{where}: every 'extra' entry must be a mapping with 'key' "
                    f"and optionally {sorted(_EXTRA_KEYS - {'key'})}"
                )
            over = item.get("over", "mean")
            if over not in _OVER:
                raise ConfigError(f"{where}: extra column {item['key']!r}: 'over' must be one of {_OVER}, got {over!r}")
            try:
                scale = float(item.get("scale", 1.0))
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: extra column {item['key']!r}: 'scale' must be a number") from None
            clients = _parse_clients(f"{where}: extra column {item['key']!r}", item)
            extras.append(
                ExtraColumn(str(item["key"]), item.get("per"), over, scale, str(item.get("label", "")), clients)
            )
        titles = [e.title for e in extras]
        repeated = sorted({t for t in titles if titles.count(t) > 1})
        if repeated:
            raise ConfigError(f"{where}: two extra columns have the title {repeated}; give each its own 'label'")
        table_cells = [c for c in cells if set(c.grids) & set(names)]
        differences = []
        for item in body.get("differences") or []:
            differences.append(_parse_difference(where, item, table_cells, option_keys))
        axes: list[str] = []
        for g in names:
            axes.extend(k for k in grids[g] if k not in axes)
        primary = body.get("primary")
        if primary is not None:
            titles = [*TEST_COLUMNS, *(e.title for e in extras)]
            if primary not in titles:
                raise ConfigError(f"{where}: 'primary' must name one of the table's columns {titles}, got {primary!r}")
            if not differences:
                raise ConfigError(f"{where}: 'primary' tests the table's differences; it declares none")
        pool = body.get("pool") or []
        pool = [pool] if isinstance(pool, str) else pool
        if not isinstance(pool, list) or any(k not in option_keys for k in pool):
            raise ConfigError(f"{where}: 'pool' must list run-config keys, got {body.get('pool')!r}")
        changed = {"seed", *(k for d in differences for k in d.keys)}
        if changed & set(pool):
            clash = sorted(changed & set(pool))
            raise ConfigError(f"{where}: 'pool' may not name seed or a key a difference changes: {clash}")
        level_off = body.get("level-off")
        if level_off is not None:
            final = [e.title for e in extras if e.over == "final"]
            if isinstance(level_off, bool) or not isinstance(level_off, (int, float)) or not level_off > 0:
                raise ConfigError(
                    f"{where}: 'level-off' must be a number > 0 (in the primary column's units), got {level_off!r}"
                )
            if primary not in final:
                raise ConfigError(
                    f"{where}: 'level-off' reads the primary column per round; 'primary' must name one of the "
                    f"'over: final' extra columns {final}, got {primary!r}"
                )
            level_off = float(level_off)
        margin = body.get("margin")
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
                raise ConfigError(
                    f"{where}: 'margin' must be a number > 0 (the smallest difference of interest, in the primary "
                    f"column's units), got {margin!r}"
                )
            if primary is None:
                raise ConfigError(
                    f"{where}: 'margin' words the tests of the primary column; the table names no 'primary'"
                )
            margin = float(margin)
        spec = TableSpec(
            str(name),
            tuple(names),
            which,
            tuple(extras),
            tuple(differences),
            tuple(axes),
            primary,
            tuple(pool),
            level_off,
            margin,
        )
        tables.append(spec)
    return tuple(tables)


def _parse_clients(where: str, item: Mapping[str, Any]) -> tuple[str, ...] | None:
    """An extra column's ``clients``: distinct client ids, for a ``client-eval/<metric>`` key only
    (``None`` when the entry has none). An id is a partition id (an integer >= 0, as a missing
    table names it) or a site's own client id (``site-a``: the node config's ``client-id``)."""
    from ...identity import client_id_problem

    if "clients" not in item:
        return None
    raw = item["clients"]
    if not str(item["key"]).startswith("client-eval/") or item.get("per") is not None:
        raise ConfigError(
            f"{where}: 'clients' restricts a client-side column to some clients; it needs a "
            f"'client-eval/<metric>' key (e.g. client-eval/test-accuracy) and no 'per', got key {item['key']!r}"
        )
    ids = raw if isinstance(raw, list) else None

    def bad(c: Any) -> bool:
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            return True
        return c < 0 if isinstance(c, int) else client_id_problem(c) is not None

    if not ids or any(bad(c) for c in ids):
        raise ConfigError(
            f"{where}: 'clients' must be a non-empty list of client ids (partition ids >= 0, or sites' "
            f"client ids such as site-a), got {raw!r}"
        )
    names = [str(c) for c in ids]
    if len(set(names)) != len(names):
        repeated = sorted({c for c in names if names.count(c) > 1})
        raise ConfigError(f"{where}: 'clients' lists client id(s) {repeated} more than once")
    return tuple(names)


def _parse_difference(where: str, item: Any, cells: Sequence[Cell], option_keys: set[str]) -> Difference:
    """One ``differences`` entry: ``key``, ``value``, ``minus``, each a scalar or (several keys) a list."""
    if not isinstance(item, dict) or set(item) != {"key", "value", "minus"}:
        raise ConfigError(f"{where}: every 'differences' entry must be a mapping with key, value and minus")
    several = isinstance(item["key"], list)
    keys = item["key"] if several else [item["key"]]
    for key in keys:
        if not isinstance(key, str) or key not in option_keys or key == "seed":
            raise ConfigError(f"{where}: difference key {key!r} is not a run-config key other than seed")
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"{where}: difference keys {keys} must be distinct and at least one")
    sides = {}
    for side in ("value", "minus"):
        given = item[side] if several else [item[side]]
        if not isinstance(given, list) or len(given) != len(keys):
            raise ConfigError(f"{where}: difference over keys {keys}: '{side}' must be a list of {len(keys)} values")
        sides[side] = [_coerce_like(v, cells, k) for k, v in zip(keys, given)]
    for values in sides.values():
        wanted = dict(zip(keys, values))
        if not any(all(c.config[k] == v for k, v in wanted.items()) for c in cells):
            present = {k: sorted({json.dumps(c.config[k]) for c in cells}) for k in keys}
            shown = ", ".join(f"{k} = {v!r}" for k, v in wanted.items())
            raise ConfigError(f"{where}: no cell of the table has {shown} (values present: {present})")
    if several:
        return Difference(tuple(keys), tuple(sides["value"]), tuple(sides["minus"]))
    return Difference(keys[0], sides["value"][0], sides["minus"][0])


def _coerce_like(value: Any, cells: Sequence[Cell], key: str) -> Any:
    """``value`` with the type the validated configs hold for ``key`` (YAML 1 vs 1.0)."""
    for cell in cells:
        current = cell.config[key]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    return value


def federation_args(plan: Plan, cell: Cell) -> str:
    options = dict(plan.federation)
    if cell.config["method"] == "centralized-p":
        options["num-supernodes"] = 1
    return " ".join(f"{k}={v}" for k, v in options.items())
