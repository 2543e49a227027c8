"""What :func:`fedprime_core.tools.features.keep_freed_memory` saves in the image-feature pass.

The fashion build's feature pass (``build_fashion build``, EfficientNet-Lite0, batch 64)
took ``real 30m, user 21m, sys 36m`` on the 2-core machine: more time in the kernel than in
the encoder. The suspect is glibc handing every freed activation buffer back to the kernel
and faulting it in again for the next batch. This benchmark runs the same pass
(:func:`~fedprime_core.tools.features.precompute_features`, ``--fit pad``) over the same
images in two arms, each in a fresh process (the malloc settings are process-wide):

* ``default``: glibc as it comes;
* ``kept``: :func:`~fedprime_core.tools.features.keep_freed_memory` first, as the
  command-line tools now do.

Arms alternate ``--repeats`` times; it prints the median wall time, images per second and
the user and system CPU seconds of the pass (the encoder's loading is not counted), and the
largest difference between the two arms' features (they must be equal: only where memory
comes from changes).

    python benchmarks/feature_pass.py --data-dir /data/fashion --images 512 --out
    python benchmarks/feature_pass.py --quick       # 16 generated images, seconds
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from _common import ROOT, machine, parser, table, write_json

ARMS = ("default", "kept")

# One pass in a fresh process: argv = arm, dataset folder, batch size, torch threads (0: torch's default).
_PASS = """
import json, resource, sys, time
from fedprime_core.tools.features import keep_freed_memory, load_image_encoder, precompute_features
arm, root, batch_size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kept = keep_freed_memory() if arm == "kept" else None
import torch
if threads:
    torch.set_num_threads(threads)
encoder = load_image_encoder("efficientnet-lite0", "cls", "cpu")
before, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
summary = precompute_features(root, ["train"], encoder, batch_size, progress=False, fit="pad")
wall, after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "arm": arm, "kept": kept, "images": summary["computed"], "wall-seconds": wall,
    "user-seconds": after.ru_utime - before.ru_utime, "system-seconds": after.ru_stime - before.ru_stime,
    "minor-page-faults": after.ru_minflt - before.ru_minflt, "peak-rss-mib": after.ru_maxrss / 1024,
    "torch-threads": torch.get_num_threads(), "folder": summary["folder"],
}))
"""


def make_images(folder: Path, count: int) -> None:
    """``count`` generated photographs (portrait, plain background, a coloured object) and a train.jsonl."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    with (folder / "train.jsonl").open("w") as out:
        for i in range(count):
            image = Image.new("RGB", (360, 480), (240, 240, 240))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            ImageDraw.Draw(image).ellipse([60, 80 + i % 40, 300, 400], fill=colour)
            image.save(folder / "images" / f"{i}.jpg", quality=90)
            out.write(json.dumps({"id": str(i), "text": f"item {i}", "img": f"images/{i}.jpg", "label": "a"}) + "\n")


def copy_slice(data_dir: Path, folder: Path, count: int) -> None:
    """The first ``count`` rows with an image of ``data_dir``'s train.jsonl, their images copied."""
    rows = []
    with (data_dir / "train.jsonl").open() as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("img"):
                record.pop("img_features", None)
                rows.append(record)
            if len(rows) == count:
                break
    if not rows:
        raise SystemExit(f"{data_dir / 'train.jsonl'} has no rows with an image")
    for record in rows:
        target = folder / record["img"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / record["img"], target)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def one_pass(arm: str, folder: Path, batch_size: int, threads: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    shutil.rmtree(folder / "features", ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-c", _PASS, arm, str(folder), str(batch_size), str(threads)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the {arm} pass failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    features = {p.name: np.load(p) for p in Path(result.pop("folder")).rglob("*.npy")}
    return result, features


def main() -> None:
    p = parser("feature_pass", __doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="", help="a dataset with train.jsonl and images (default: generated)")
    p.add_argument("--images", type=int, default=512, help="images per pass (default 512)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64, build_fashion's")
    p.add_argument("--threads", type=int, default=0, help="torch threads per pass (default: torch's own)")
    p.add_argument("--repeats", type=int, default=3, help="passes of each arm, alternated (default 3)")
    args = p.parse_args()
    info = machine()
    count = 16 if args.quick else args.images
    batch_size = 8 if args.quick else args.batch_size
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="feature-pass-") as tmp:
        folder = Path(tmp) / "data"
        if args.data_dir and not args.quick:
            copy_slice(Path(args.data_dir), folder, count)
        else:
            make_images(folder, count)
        runs, features = [], {}
        for _ in range(repeats):
            for arm in ARMS:
                result, features[arm] = one_pass(arm, folder, batch_size, args.threads)
                runs.append(result)
                print(
                    f"{arm}: {result['images']} images in {result['wall-seconds']:.1f} s "
                    f"(user {result['user-seconds']:.1f} s, system {result['system-seconds']:.1f} s)",
                    flush=True,
                )
    difference = max(float(np.max(np.abs(features["default"][k] - features["kept"][k]))) for k in features["default"])
    arms = []
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        row = {key: statistics.median(r[key] for r in mine) for key in mine[0] if key.endswith(("seconds", "faults"))}
        row.update(arm=arm, kept=mine[0]["kept"], images=mine[0]["images"], repeats=len(mine))
        row["peak-rss-mib"] = max(r["peak-rss-mib"] for r in mine)
        row["images-per-second"] = row["images"] / row["wall-seconds"]
        row["torch-threads"] = mine[0]["torch-threads"]
        arms.append(row)
    default, kept = arms
    print(
        table(
            ["arm", "images/s", "wall s", "user s", "system s", "minor page faults", "peak RSS MiB"],
            [
                [
                    a["arm"],
                    a["images-per-second"],
                    a["wall-seconds"],
                    a["user-seconds"],
                    a["system-seconds"],
                    a["minor-page-faults"],
                    a["peak-rss-mib"],
                ]
                for a in arms
            ],
        )
    )
    speedup = kept["images-per-second"] / default["images-per-second"]
    print(f"kept / default: {speedup:.2f}x the images per second; features differ by at most {difference:.1e}")
    write_json(
        args.out,
        {
            "benchmark": "feature_pass",
            "machine": info,
            "data": args.data_dir if args.data_dir and not args.quick else "generated",
            "batch-size": batch_size,
            "arms": arms,
            "speedup": speedup,
            "max-abs-feature-difference": difference,
        },
    )
    if difference != 0.0:
        raise SystemExit("the two arms' features differ: where memory comes from must not change them")


if __name__ == "__main__":
    main()
