"""Regenerate the two copies of the configuration reference from fedprime_core/config.py.

    python scripts/sync_config_docs.py

Rewrites the ``[tool.flwr.app.config]`` table of pyproject.toml (defaults with a comment
per key) and the configuration table of docs/configuration.md. tests/test_config.py fails when they
drift from the schema, and names this script.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from fedprime_core.config import OPTIONS

ROOT = Path(__file__).resolve().parents[1]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _help(option) -> tuple[str, str]:
    choices = option.choices or ()
    resume = " May change when resuming a run." if option.resumable else ""
    return (
        option.help + (f" One of: {', '.join(choices)}." if choices else "") + resume,
        option.help + (f" One of: `{'`, `'.join(choices)}`." if choices else "") + resume,
    )


def pyproject_table() -> list[str]:
    lines: list[str] = []
    for option in OPTIONS:
        lines += [f"# {line}" for line in textwrap.wrap(_help(option)[0], 86)]
        lines.append(f"{option.key} = {_toml_value(option.default)}")
    return lines


#: The documentation page that holds the options table.
DOCS_TABLE = "docs/configuration.md"


def readme_table() -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for option in OPTIONS:
        default = option.default
        shown = _toml_value(default) if not isinstance(default, float) else repr(default)
        rows.append(f"| `{option.key}` | `{shown}` | {_help(option)[1]} |")
    return rows


def main() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text().split("\n")
    start = pyproject.index("[tool.flwr.app.config]") + 1
    end = next(i for i in range(start, len(pyproject)) if pyproject[i].startswith("[") and i > start)
    pyproject[start:end] = [*pyproject_table(), ""]
    (ROOT / "pyproject.toml").write_text("\n".join(pyproject))
    readme = (ROOT / DOCS_TABLE).read_text().split("\n")
    start = readme.index("| key | default | meaning |")
    end = start
    while end < len(readme) and readme[end].startswith("|"):
        end += 1
    readme[start:end] = readme_table()
    (ROOT / DOCS_TABLE).write_text("\n".join(readme))
    print(f"pyproject.toml and {DOCS_TABLE} configuration tables regenerated")


if __name__ == "__main__":
    main()
