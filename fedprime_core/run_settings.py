"""The run layer's reading of a :class:`~fedprime_core.config.RunConfig` into what each part takes.

``method/``, ``data/`` and ``backbones/`` never read the run configuration (they do not import
:mod:`fedprime_core.config`): each takes plain values or a small settings dataclass of its own
(:class:`~fedprime_core.method.model.PromptSettings`,
:class:`~fedprime_core.method.training.TrainSettings`,
:class:`~fedprime_core.data.shards.ShardSettings`). This module fills them from a run's config,
for :mod:`fedprime_core.runtime`, the tools, benchmarks and tests.
"""

from __future__ import annotations

import dataclasses

from .backbones.base import Backbone
from .config import RunConfig
from .data.shards import ShardSettings
from .method.methods import method_spec
from .method.model import PromptedModel, PromptSettings
from .method.training import TrainSettings


def shard_settings(cfg: RunConfig) -> ShardSettings:
    """The keys that decide the shards and held-out sets (:class:`ShardSettings` names them as the config does)."""
    return ShardSettings(**{field.name: getattr(cfg, field.name) for field in dataclasses.fields(ShardSettings)})


def prompt_settings(cfg: RunConfig) -> PromptSettings:
    """The prompt sizes of a run."""
    return PromptSettings(
        tau=cfg.tau,
        kappa=cfg.kappa,
        length=cfg.prompt_length,
        selection=cfg.selection,
        map_length=cfg.map_prompt_length,
        map_depth=cfg.map_prompt_depth,
        map_init=cfg.map_prompt_init,
        query_rank=cfg.query_rank,
    )


def train_settings(cfg: RunConfig) -> TrainSettings:
    """How a client of the run trains (the proximal term only for a method that has one)."""
    return TrainSettings(
        epochs=cfg.local_epochs,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lambda_reg=cfg.lambda_reg,
        proximal_mu=cfg.mu if method_spec(cfg.method).proximal else 0.0,
        max_grad_norm=cfg.max_grad_norm,
    )


def prompted_model(backbone: Backbone, cfg: RunConfig, num_classes: int, seed: int) -> PromptedModel:
    """The model a run of ``cfg`` trains: its method, prompt sizes and communication keys
    (``query-rank``, ``exchange-pooler``, ``head-rank``, ``pooler-rank``), ``readout`` and ``pooler-init``."""
    return PromptedModel(
        backbone,
        method_spec(cfg.method),
        num_classes,
        prompt_settings(cfg),
        seed=seed,
        train_pooler=cfg.exchange_pooler,
        head_rank=cfg.head_rank,
        pooler_rank=cfg.pooler_rank,
        readout=cfg.readout,
        pooler_init=cfg.pooler_init,
    )
