"""Small site folders for tests: each site its own data, label subset and real missing modalities.

:func:`make_sites` writes the embedded dataset (FoodToy) to disk, then three site folders
whose rows *really* miss text or image in planted numbers, a server held-out folder, and
returns what was planted so that tests can compare it with what the run reports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedprime_core.data.prepare import export_embedded

ROWS_PER_SITE = 40
DEV_PER_SITE = 8


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(folder: Path, name: str, rows: list[dict[str, Any]], source: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.get("img"):
            (folder / row["img"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / row["img"], folder / row["img"])
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copyfile(source / "classes.txt", folder / "classes.txt")


def make_sites(root: Path, seed: int = 0) -> dict[str, Any]:
    """Write ``root/data`` (FoodToy), ``root/site-a|b|c`` and ``root/server``; return the plan.

    * ``site-a``: the first 4 classes only; every 5th row has no text (field absent);
    * ``site-b``: the last 4 classes only; every 4th row has no image (``"img": null``);
    * ``site-c``: every class; 5 rows with empty text, 5 without ``img``, 2 with neither
      (skipped by the loader and counted).

    Each site has a small complete ``dev.jsonl`` (its local validation split), so that its
    training set is exactly its ``train.jsonl``. The server folder holds FoodToy's dev and
    test splits. Every folder holds the same ``classes.txt``.

    Returns:
        ``{"root", "server", "classes", "sites": {name: {"dir", "classes", "rows",
        "text-missing", "image-missing", "skipped"}}}`` (rows: usable training rows).
    """
    data = export_embedded(root / "data", seed=seed, num_train=400, num_dev=24, num_test=48)
    classes = [line for line in (data / "classes.txt").read_text().splitlines() if line]
    train = _rows(data / "train.jsonl")
    plan: dict[str, Any] = {"root": root, "classes": classes, "sites": {}}

    def take(labels: set[str], count: int, offset: int) -> list[dict[str, Any]]:
        chosen = [r for r in train if r["label"] in labels][offset : offset + count]
        assert len(chosen) == count, "not enough generated rows for the site"
        return [dict(r) for r in chosen]

    a = take(set(classes[:4]), ROWS_PER_SITE + DEV_PER_SITE, 0)
    for i, row in enumerate(a[:ROWS_PER_SITE]):
        if i % 5 == 0:
            row.pop("text")
    b = take(set(classes[4:]), ROWS_PER_SITE + DEV_PER_SITE, 0)
    for i, row in enumerate(b[:ROWS_PER_SITE]):
        if i % 4 == 0:
            row["img"] = None
    c = take(set(classes), ROWS_PER_SITE + DEV_PER_SITE, 100)
    for i, row in enumerate(c[:ROWS_PER_SITE]):
        if i % 8 == 1:
            row["text"] = ""
        elif i % 8 == 2:
            row.pop("img")
        elif i in (3, 23):
            row.pop("text")
            row["img"] = ""
    planted = {
        "site-a": (a, 8, 0, 0),
        "site-b": (b, 0, 10, 0),
        "site-c": (c, 5, 5, 2),
    }
    for name, (rows, text_missing, image_missing, skipped) in planted.items():
        folder = root / name
        _write(folder, "train.jsonl", rows[:ROWS_PER_SITE], data)
        _write(folder, "dev.jsonl", rows[ROWS_PER_SITE:], data)
        plan["sites"][name] = {
            "dir": folder,
            "classes": sorted({r["label"] for r in rows[:ROWS_PER_SITE]}),
            "rows": ROWS_PER_SITE - skipped,
            "text-missing": text_missing,
            "image-missing": image_missing,
            "skipped": skipped,
        }
    server = root / "server"
    _write(server, "dev.jsonl", _rows(data / "dev.jsonl"), data)
    _write(server, "test.jsonl", _rows(data / "test.jsonl"), data)
    plan["server"] = server
    return plan
