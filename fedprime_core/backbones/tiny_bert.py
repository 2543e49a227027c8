"""``tiny-bert``: a small BERT pretrained offline, for the text-encoder backbone's tests and demo.

Width 64, 2 blocks, 4 heads (as ``tiny-vilt``, :mod:`.tiny`), the embedded dataset's word
tokenizer, pretrained for 400 steps of masked language modelling on a generated caption
corpus, half of it as sentence pairs (:func:`generate_tiny_bert`), with the pretraining loop
``tiny-vilt`` uses (:func:`.generated.pretrain`). Its weights ship with the package
(:mod:`.shipped`); :func:`ensure_tiny_bert` unpacks them once per machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..devices import single_thread
from .generated import ensure_tiny, made_with, masked_tokens, pretrain
from .kinds import TINY_BERT

LOGGER = logging.getLogger(__name__)

#: Bumped whenever the generated model changes (the shipped file is named after it).
TINY_BERT_VERSION = 1
TINY_BERT_SEED = 20250701
TINY_BERT_STEPS = 400
_TINY_BERT_BATCH = 64
_TINY_BERT_LR = 2e-3
_CORPUS_SEED = 424243


def tiny_bert_config(vocab_size: int):
    """The architecture of ``tiny-bert``: width 64, 2 blocks, 4 heads (as ``tiny-vilt``)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        type_vocab_size=2,
    )


def _pretrain_tiny_bert(model, tokenizer, steps: int) -> float:
    """Masked language modelling on a generated, unlabeled caption corpus, half as sentence pairs.

    A pair is the two halves of one caption, ``[CLS] first [SEP] second [SEP]`` with token
    type 1 on the second: both halves describe the same dish, so predicting a masked word
    pays to look across the segment boundary. That is the habit the image tokens need, as
    they arrive as segment B (token type 1) after the text.
    """
    from ..data.embedded import make_embedded_dataset

    texts = [s.text for s in make_embedded_dataset(_CORPUS_SEED, num_train=3000, num_dev=0, num_test=0).train]
    halves = [t.split() for t in texts]
    first = [" ".join(w[: len(w) // 2]) for w in halves]
    second = [" ".join(w[len(w) // 2 :]) for w in halves]
    single = tokenizer(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    pairs = tokenizer(first, second, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    data = {k: torch.cat([single[k], pairs[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    vocab = len(tokenizer)
    head = nn.Linear(model.config.hidden_size, vocab)

    def losses(idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        inputs, targets = masked_tokens(data["input_ids"][idx], tokenizer, generator)
        states = model(
            input_ids=inputs, attention_mask=data["attention_mask"][idx], token_type_ids=data["token_type_ids"][idx]
        ).last_hidden_state
        return {"mlm": F.cross_entropy(head(states).reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)}

    tail = pretrain(
        TINY_BERT,
        model,
        (head,),
        losses,
        num_rows=len(data["input_ids"]),
        steps=steps,
        batch=_TINY_BERT_BATCH,
        lr=_TINY_BERT_LR,
        seed=TINY_BERT_SEED,
    )
    return tail["mlm"]


def generate_tiny_bert(steps: int = TINY_BERT_STEPS) -> tuple[Any, Any, dict[str, Any]]:
    """Build and pretrain ``tiny-bert`` from scratch: ``(model, tokenizer, made_with)``.

    Seeded and run on one CPU thread: the same torch build and CPU give the same weights
    bit for bit.
    """
    from transformers import BertModel

    from ..data.embedded import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_BERT_SEED)
        model = BertModel(tiny_bert_config(len(tokenizer)))
        loss = _pretrain_tiny_bert(model, tokenizer, steps) if steps else float("nan")
    LOGGER.info("%s MLM loss (last 50 steps): %.3f", TINY_BERT, loss)
    info = made_with(
        "fedprime_core.backbones.tiny_bert.generate_tiny_bert", seed=TINY_BERT_SEED, steps=steps, mlm=round(loss, 4)
    )
    return model, tokenizer, info


def generate_tiny_bert_weights() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a freshly generated ``tiny-bert`` and how it was made (for :mod:`.shipped`)."""
    model, _, info = generate_tiny_bert()
    return model.state_dict(), info


def assemble_tiny_bert(state: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """``tiny-bert`` from its weights: ``(model, tokenizer)``."""
    from transformers import BertModel

    from ..data.embedded import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    model = BertModel(tiny_bert_config(len(tokenizer)))
    model.load_state_dict(dict(state), strict=True)
    return model.eval(), tokenizer


def ensure_tiny_bert(directory: Path | None = None) -> Path:
    """The ``save_pretrained`` directory of ``tiny-bert``: the shipped weights, unpacked once per machine."""

    def generate() -> tuple[Any, ...]:
        return generate_tiny_bert()[:2]

    return ensure_tiny(TINY_BERT, TINY_BERT_VERSION, assemble_tiny_bert, generate, directory)
