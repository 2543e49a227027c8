"""Local training throughput (samples/s) of the prompted ViLT-B/32 architecture and of tiny-vilt.

One training step is what ``fedprime_core.method.training.train_local`` does per batch: forward
through the frozen backbone with the retrieved prompts prepended, task loss + lambda x
retrieval regulariser, backward into the trainable parts only (prompts, keys, query maps,
pooler, head; the backbone's weights get no gradients, but the gradient still flows back
through every block to the input prompts), gradient clipping, an SGD step.

* **ViLT-B/32**: ``ViltModel(ViltConfig())`` (random weights, the architecture of
  ``dandelin/vilt-b32-mlm``), method ``fedprime`` (tau 20, kappa 5 per pool), 8 classes,
  batch 8 of 384x384 images (144 patches) and 40 text tokens: 10 prompt + 40 text +
  145 image tokens per sample. Inputs are random tensors of the real shapes (the
  throughput does not depend on their values).
* **tiny-vilt**: the repository's embedded-demo backbone on real FoodToy batches
  (``fedprime_core.runtime``), same method and batch size, for reference.

Also reports forward-only (evaluation) throughput. ``--device cuda`` runs on the GPU under
``torch.autocast(dtype=torch.bfloat16)`` and reports the peak GPU memory
(``torch.cuda.max_memory_allocated``) of the training steps. The CUDA path was written
without a GPU at hand and has not been run.

Run: ``python benchmarks/throughput.py [--quick] [--device cpu|cuda] [--out]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import machine, parser, table, write_json

from fedprime_core.method.methods import method_spec
from fedprime_core.method.model import PromptedModel, PromptSettings
from fedprime_core.method.training import TrainSettings, make_optimizer, task_loss, to_device

NUM_CLASSES = 8


def vilt_b32_batch(batch_size: int, image_size: int, text_length: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch_size, text_length), generator=generator)
    ids[:, 0] = 101  # [CLS]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(batch_size, text_length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch_size, text_length, dtype=torch.long),
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "pixel_mask": torch.ones(batch_size, image_size, image_size, dtype=torch.long),
        "labels": torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        "missing_type": torch.zeros(batch_size, dtype=torch.long),
    }


def autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: PromptedModel,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    steps: int,
    warmup: int,
    bf16: bool,
    eval_steps: int,
) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) and ``eval_steps`` forward-only steps."""
    settings = TrainSettings()
    params = model.trainable_parameters()
    optimizer = make_optimizer(params.values(), settings)
    batches = [to_device(b, device) for b in batches]
    model.train()

    def train_step(batch: dict[str, torch.Tensor]) -> None:
        with autocast(device, bf16):
            out = model(batch)
            loss = task_loss(out.logits.float(), batch["labels"], False)
            objective = loss + settings.lambda_reg * out.regulariser.float()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), settings.max_grad_norm)
        optimizer.step()

    for i in range(warmup):
        train_step(batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu = [], []
    for i in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    result: dict[str, Any] = {}
    if device.type == "cuda":
        result["peak-memory-bytes"] = int(torch.cuda.max_memory_allocated(device))
    model.eval()
    eval_times = []
    with torch.no_grad():
        for i in range(eval_steps + 1):
            start = time.perf_counter()
            with autocast(device, bf16):
                model(batches[i % len(batches)])
            sync(device)
            if i:  # the first forward-only step is a warm-up
                eval_times.append(time.perf_counter() - start)
    batch_size = int(batches[0]["labels"].shape[0])
    step = statistics.median(times)
    result.update(
        {
            "batch-size": batch_size,
            "train-steps-timed": steps,
            "train-step-seconds": step,
            "train-step-times": [round(t, 4) for t in times],
            "train-step-cpu-seconds": statistics.median(cpu),
            "train-samples-per-second": batch_size / step,
        }
    )
    if eval_times:
        result["eval-step-seconds"] = statistics.median(eval_times)
        result["eval-samples-per-second"] = batch_size / result["eval-step-seconds"]
    return result


def bench_vilt_b32(args, device: torch.device, bf16: bool) -> dict[str, Any]:
    from transformers import ViltConfig, ViltModel

    from fedprime_core.backbones.vilt import ViltBackbone

    config = ViltConfig(num_hidden_layers=2) if args.quick else ViltConfig()
    image_size = 64 if args.quick else config.image_size
    text_length = config.max_position_embeddings
    backbone = ViltBackbone(ViltModel(config))
    model = PromptedModel(backbone, method_spec("fedprime"), NUM_CLASSES, PromptSettings(tau=20, kappa=5), seed=0)
    model.to(device)
    batch = vilt_b32_batch(args.batch_size, image_size, text_length, config.vocab_size)
    res = measure(model, [batch], device, args.steps, args.warmup, bf16, args.eval_steps)
    patches = (image_size // config.patch_size) ** 2
    res["tokens-per-sample"] = 2 * 5 + text_length + 1 + patches  # prompts + text + image [CLS] + patches
    res["image-size"], res["text-length"], res["blocks"] = image_size, text_length, config.num_hidden_layers
    return res


def bench_tiny(args, device: torch.device, bf16: bool) -> dict[str, Any]:
    from fedprime_core import runtime
    from fedprime_core.config import parse_run_config
    from fedprime_core.data.processing import make_loader

    cfg = parse_run_config({"batch-size": args.batch_size, "device": device.type})
    shard = runtime.client_shard(cfg, 0, 2)
    loader = make_loader(shard.train, args.batch_size, shuffle=True, seed=0)
    batches = []
    for batch in loader:  # processes (and caches) the images once, outside the timing
        batches.append(batch)
        if len(batches) == 8:
            break
    model = runtime.build_model(cfg)
    steps = max(args.steps, 8) if not args.quick else 2
    res = measure(model, batches, device, steps * 4, args.warmup, bf16, steps)
    res["pixel-values-shape"] = list(batches[0]["pixel_values"].shape)
    res["text-length"] = int(batches[0]["input_ids"].shape[1])
    return res


def main() -> None:
    p = parser("throughput", __doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed training steps of ViLT-B/32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-steps", type=int, default=2, help="timed forward-only steps of ViLT-B/32")
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast (default: on for cuda)"
    )
    p.add_argument("--no-tiny", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.eval_steps = 1, 1, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    bf16 = (device.type == "cuda") if args.bf16 is None else args.bf16
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch-threads']} threads)")
    print(f"device {device}, {'bf16 autocast' if bf16 else 'float32'}, batch {args.batch_size}\n")
    results: dict[str, Any] = {}
    results["vilt-b32"] = bench_vilt_b32(args, device, bf16)
    r = results["vilt-b32"]
    print(
        f"ViLT-B/32{' (quick: 2 blocks, 64 px)' if args.quick else ''} fedprime: train "
        f"{r['train-samples-per-second']:.2f} samples/s ({r['train-step-seconds']:.2f} s per batch of "
        f"{r['batch-size']}; CPU {r['train-step-cpu-seconds']:.2f} s), "
        f"eval {r.get('eval-samples-per-second', float('nan')):.2f} samples/s",
        flush=True,
    )
    if not args.no_tiny:
        results["tiny-vilt"] = bench_tiny(args, device, bf16)
        t = results["tiny-vilt"]
        print(
            f"tiny-vilt fedprime: train {t['train-samples-per-second']:.1f} samples/s "
            f"({1000 * t['train-step-seconds']:.1f} ms per batch), eval {t['eval-samples-per-second']:.1f} samples/s",
            flush=True,
        )
    rows = []
    for name, res in results.items():
        row = [name, res["train-samples-per-second"], res["train-step-seconds"], res.get("eval-samples-per-second")]
        if device.type == "cuda":
            row.append(f"{res['peak-memory-bytes'] / 2**30:.2f}")
        rows.append(row)
    headers = ["model", "train samples/s", "s per train batch", "eval samples/s"]
    if device.type == "cuda":
        headers.append("peak GPU memory GiB")
    print()
    print(table(headers, rows))
    write_json(
        args.out,
        {
            "benchmark": "throughput",
            "machine": info,
            "settings": {
                "device": str(device),
                "bf16": bf16,
                "batch-size": args.batch_size,
                "method": "fedprime",
                "tau": 20,
                "kappa": 5,
                "quick": args.quick,
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
