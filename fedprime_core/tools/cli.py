"""Small command-line helpers around the run configuration.

python -m fedprime_core.tools.cli toml experiment.yaml > experiment.toml   # for flwr run --run-config
python -m fedprime_core.tools.cli check experiment.yaml                    # validate, print the resolved config
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import ConfigError, config_to_dict, load_yaml_config, parse_run_config


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedprime_core.tools.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    toml = sub.add_parser("toml", help="convert a YAML file of run-config keys to TOML overrides")
    toml.add_argument("yaml")
    check = sub.add_parser("check", help="validate a YAML file of run-config keys and print the full config")
    check.add_argument("yaml")
    args = parser.parse_args(argv)
    try:
        values = load_yaml_config(args.yaml)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "toml":
        sys.stdout.write(to_toml(values))
    else:
        sys.stdout.write(to_toml(config_to_dict(parse_run_config(values))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
