"""Small command-line helpers around the run configuration.

python -m fedprime_core.tools.cli check --run-config 'method="fedprime" num-server-rounds=3'  # what flwr run takes
python -m fedprime_core.tools.cli check experiment.yaml                    # validate, print the resolved config
python -m fedprime_core.tools.cli toml experiment.yaml > experiment.toml   # for flwr run --run-config

``check`` validates in a fraction of a second what a ``flwr run`` would find out only once its
ServerApp starts (or, for a misspelt key, what the SuperLink refuses with nothing but
"[code: 15] Invalid run configuration."): every key, every value, the rules between keys, and
the files the config names (the ``missing-table`` file and every entry in it, that ``data-dir``
is a folder holding a split file of the dataset's layout, that ``resume`` names a run folder
with a checkpoint). It reads no data row: a bad row is found by the server's check before
round 1.
It reads the run config as ``flwr run --run-config`` does (space-separated ``key=value`` with
TOML values, strings in double quotes; or a ``.toml`` file), or a YAML file of the experiments.
Exit status 0: valid (the full config is printed as TOML); 2: an error, named on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, config_to_dict, load_yaml_config, parse_run_config
from ..data.datasets import dataset as dataset_spec
from ..data.loaders import check_dataset_root
from ..data.missing import check_missing_table
from ..data.records import DataError
from ..results import find_checkpoint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport flwr depends on
    import tomli as tomllib

#: ``key=value`` pairs as Flower's ``flwr run --run-config`` finds them (flwr.common.config.parse_config_args).
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def to_toml(values: Mapping[str, Any]) -> str:
    """Flat TOML of run-config overrides (strings quoted JSON-style, which TOML accepts)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def parse_run_config_args(args: Sequence[str]) -> dict[str, Any]:
    """The overrides of ``flwr run --run-config ARG [--run-config ARG ...]``, read as Flower reads them.

    Raises:
        ConfigError: a value is not a TOML value (a string without quotes, say), a token is
            not ``key=value``, or a ``.toml`` file cannot be read.
    """
    if len(args) == 1 and args[0].endswith(".toml"):
        path = Path(args[0]).expanduser()
        try:
            return _flatten(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read run config file {str(path)!r}: {exc}") from None
    values: dict[str, Any] = {}
    for arg in args:
        if arg.endswith(".toml"):
            raise ConfigError("a .toml run config file cannot be given alongside key=value pairs")
        pairs = _PAIR.findall(arg)
        leftover = _PAIR.sub("", arg).strip()
        if leftover:
            raise ConfigError(
                f"{leftover!r} in --run-config is not a key=value pair (Flower would ignore it); write key=value "
                "with no spaces around '=', strings in double quotes"
            )
        for key, value in pairs:
            try:
                values.update(_flatten(tomllib.loads(f"{key} = {value}")))
            except tomllib.TOMLDecodeError:
                hint = f' (a string needs quotes: {key}="{value}")' if value[:1] not in "\"'" else ""
                raise ConfigError(
                    f"--run-config {key}={value}: {value!r} is not a TOML value{hint}; flwr run refuses the whole "
                    "string ('The provided configuration string is in an invalid format')"
                ) from None
    return values


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def check_files(cfg: RunConfig) -> None:
    """The files a valid run config names, checked without reading a data row.

    Raises:
        DataError: the ``missing-table`` file is absent or malformed, or ``data-dir`` is not a
            folder holding a split file of the dataset (under ``data-layout``).
        FileNotFoundError: ``resume`` names no run folder with a checkpoint.
    """
    if cfg.missing_table:
        check_missing_table(cfg.missing_table)
    if cfg.data_dir and not dataset_spec(cfg.dataset).generated:
        try:
            check_dataset_root(cfg.dataset, Path(cfg.data_dir).expanduser(), cfg.data_layout)
        except DataError as exc:
            raise DataError(f"run config key 'data-dir': {exc}") from None
    if cfg.resume:
        find_checkpoint(cfg.resume)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    toml = sub.add_parser("toml", help="convert a YAML file of run-config keys to TOML overrides")
    toml.add_argument("yaml")
    check = sub.add_parser(
        "check", help="validate a run config (flwr run's --run-config string, or a YAML file) and print it in full"
    )
    check.add_argument("yaml", nargs="?", help="a YAML (or .toml) file of run-config keys")
    check.add_argument(
        "--run-config",
        action="append",
        metavar="ARGS",
        help="the same string (or .toml file) as `flwr run . --run-config`; may be repeated, as with flwr run",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "check" and args.run_config:
            values = parse_run_config_args(args.run_config)
            if args.yaml:
                values = {**load_yaml_config(args.yaml), **values}
        elif args.yaml and args.command == "check" and args.yaml.endswith(".toml"):
            values = parse_run_config_args([args.yaml])
        elif args.yaml:
            values = load_yaml_config(args.yaml)
        else:
            parser.error("check needs a YAML file or --run-config")
        if args.command == "toml":
            sys.stdout.write(to_toml(values))
        else:
            cfg = parse_run_config(values)
            check_files(cfg)
            sys.stdout.write(to_toml(config_to_dict(cfg)))
            print(f"# run config OK: {len(values)} key(s) set, the rest default", file=sys.stderr)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
