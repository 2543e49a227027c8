"""Local training and evaluation of a :class:`~fedprime_core.method.model.PromptedModel`."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics import classification_metrics
from .model import PromptedModel
from .retrieval import pattern_usage_counts, usage_counts

LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How a client trains in one round (reference: SGD, lr 0.05, 1 epoch, lambda 0.01)."""

    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    lambda_reg: float = 0.01
    proximal_mu: float = 0.0
    max_grad_norm: float = 1.0
    """Bound on the gradient norm of each parameter group (:meth:`PromptedModel.parameter_groups`); 0 disables."""


@dataclasses.dataclass
class TrainResult:
    """What one local training call reports.

    Attributes:
        loss: mean task loss (CE or BCE) over all samples seen.
        regulariser: mean retrieval regulariser.
        num_examples: samples in the client's training set.
        steps: optimizer steps taken.
        usage: pool name -> ``(pool_size,)`` int64 selection counts over the whole call.
        seconds: wall time.
        pattern_usage: pool name -> ``(3, pool_size)`` int64 counts of ``usage`` split by
            the missing pattern of the selecting sample.
    """

    loss: float
    regulariser: float
    num_examples: int
    steps: int
    usage: dict[str, np.ndarray]
    seconds: float
    pattern_usage: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy (single-label) or binary cross-entropy on logits (multi-label)."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


def make_optimizer(params: Iterable[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The local optimizer named by ``settings.optimizer``."""
    params = list(params)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; use sgd, adam or adamw")


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_local(
    model: PromptedModel,
    loader: Iterable[Mapping[str, torch.Tensor]],
    settings: TrainSettings,
    multilabel: bool = False,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Train only the trainable parts for ``settings.epochs`` epochs.

    The loss is ``task + lambda * retrieval_regulariser`` (+ ``mu/2 ||w - w_start||^2``
    when ``proximal_mu > 0``, FedProx, with ``w_start`` the weights at the call's start).
    Gradients are clipped per parameter group (prompts, retrieval, head, ...), so the
    head's gradient never scales the prompts' away.

    Args:
        model: the prompted model (already on ``device``).
        loader: batches from :func:`fedprime_core.data.processing.make_loader`.
        settings: optimizer and loss settings.
        multilabel: BCE instead of CE.
        device: where batches go.
    """
    start = time.perf_counter()
    params = model.trainable_parameters()
    groups = list(model.parameter_groups().values())
    optimizer = make_optimizer(params.values(), settings)
    anchor = {k: p.detach().clone() for k, p in params.items()} if settings.proximal_mu > 0 else None
    usage = {name: torch.zeros(pool.size, dtype=torch.long) for name, pool in model.pools.items()}
    by_pattern = {name: torch.zeros(3, pool.size, dtype=torch.long) for name, pool in model.pools.items()}
    model.train()
    total_loss = total_reg = 0.0
    seen = steps = 0
    for _ in range(settings.epochs):
        for batch in loader:
            batch = to_device(batch, device)
            out = model(batch)
            loss = task_loss(out.logits, batch["labels"], multilabel)
            objective = loss + settings.lambda_reg * out.regulariser
            if anchor is not None:
                prox = sum((p - anchor[k]).pow(2).sum() for k, p in params.items())
                objective = objective + 0.5 * settings.proximal_mu * prox
            if not torch.isfinite(objective):
                raise FloatingPointError(
                    f"local loss became {objective.item()} at step {steps}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if settings.max_grad_norm > 0:
                for group in groups:
                    torch.nn.utils.clip_grad_norm_(group, settings.max_grad_norm)
            optimizer.step()
            n = int(batch["labels"].shape[0])
            total_loss += float(loss.detach()) * n
            total_reg += float(out.regulariser.detach()) * n
            seen += n
            steps += 1
            patterns = batch["missing_type"].detach().cpu()
            for name, selected in out.selected.items():
                selected = selected.detach().cpu()
                usage[name] += usage_counts(selected, usage[name].numel())
                by_pattern[name] += pattern_usage_counts(selected, patterns, usage[name].numel())
    model.eval()
    epochs = max(settings.epochs, 1)
    return TrainResult(
        loss=total_loss / max(seen, 1),
        regulariser=total_reg / max(seen, 1),
        num_examples=seen // epochs,
        steps=steps,
        usage={k: v.numpy().astype(np.int64) for k, v in usage.items()},
        seconds=time.perf_counter() - start,
        pattern_usage={k: v.numpy().astype(np.int64) for k, v in by_pattern.items()},
    )


@torch.no_grad()
def predict(
    model: PromptedModel, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, C)`` and labels of every sample in ``loader``."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits.append(model(batch).logits.float().cpu())
        labels.append(batch["labels"].cpu())
    if not logits:
        return np.zeros((0, model.num_classes), dtype=np.float32), np.zeros(0)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: PromptedModel,
    loader: Iterable[Mapping[str, torch.Tensor]],
    multilabel: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss, accuracy, macro-F1 and micro-F1 of ``model`` on ``loader``.

    Returns:
        ``{"loss", "accuracy", "macro_f1", "micro_f1", "num-examples"}``.
    """
    logits, labels = predict(model, loader, device)
    if len(logits) == 0:
        return {"loss": float("nan"), "accuracy": 0.0, "macro_f1": 0.0, "micro_f1": 0.0, "num-examples": 0}
    loss = float(task_loss(torch.from_numpy(logits), torch.from_numpy(labels), multilabel))
    out = classification_metrics(logits, labels, multilabel)
    out["loss"] = loss
    out["num-examples"] = len(logits)
    return out
