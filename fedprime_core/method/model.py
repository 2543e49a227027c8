"""The prompted model: a frozen backbone plus the only trainable (and exchanged) parts.

Trainable parts, by method (see :mod:`fedprime_core.method.methods`):

* ``pools.<name>``: a :class:`PromptPool` per retrieval pool (``intra`` and/or ``inter``):
  prompts ``(tau, length, d)``, keys ``(tau, d)`` and a query map ``d -> d``: dense
  (``query.weight`` ``(d, d)``, ``query.bias`` ``(d,)``: ``d^2 + d`` parameters) or, with
  ``query_rank = r > 0``, :class:`LowRankQuery` (the identity plus ``query.up @ query.down``,
  ``(d, r)`` and ``(r, d)``, and ``query.bias``: ``2rd + d`` parameters);
  for ``pfpt`` a :class:`PFPTPromptPool` instead (prompts ``(tau, length, d)`` that are their own
  keys, and a query map ``d -> d`` of the frozen [CLS] feature);
* ``map_prompts``: :class:`MissingAwarePrompts` for ``fedavg-p``;
* ``pooler`` (``d -> d``, tanh; started from the backbone's pretrained pooler; trained and
  exchanged unless ``train_pooler=False`` keeps it frozen; with ``pooler_rank = r > 0`` a
  :class:`LowRankPooler`: the pretrained map frozen plus a trained rank-``r`` update and bias) and
  ``head`` (``d -> 2d -> LayerNorm -> GELU -> C``, as in the reference; with ``head_rank = r > 0``
  its first layer is a :class:`LowRankLinear`, ``2d x r`` and ``r x d`` factors and a bias);
* whatever the backbone names in ``trainable_modules()`` (e.g. an image-feature projection).

Retrieval prompts are input tokens prepended once before block 0, in pool order
(``[intra kappa | inter kappa | text | image]``), without position or type embeddings and
with attention mask 1. The pooler reads the final state of the sequence's [CLS] token (or, with
``readout="first-prompt"``, for comparison with the reference code only, that of the first
retrieval prompt).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone, Batch
from .methods import MAP_PROMPT_INITS, POOLER_INITS, READOUTS, MethodSpec
from .retrieval import cosine_relevance, retrieval_regulariser, select_prompts

#: Missing-modality patterns, in the order of missing-aware prompt sets.
NUM_PATTERNS = 3


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """Sizes of the prompt parts (paper defaults: tau 20, kappa 5 per pool)."""

    tau: int = 20
    kappa: int = 5
    length: int = 1
    selection: str = "sample"
    map_length: int = 16
    map_depth: int = 6
    map_init: str = "normal"
    query_rank: int = 0
    """0: dense query maps; r > 0: identity plus a rank-r update (:class:`LowRankQuery`). Keyed pools
    only: :class:`PFPTPromptPool` keeps PFPT's dense projection."""


@dataclasses.dataclass
class PromptedOutput:
    """Result of a forward pass.

    Attributes:
        logits: ``(B, C)``.
        regulariser: scalar retrieval regulariser (0 when the model has no pools).
        selected: pool name -> ``(B, kappa)`` indices of the prompts each sample used.
    """

    logits: torch.Tensor
    regulariser: torch.Tensor
    selected: dict[str, torch.Tensor]


class LowRankQuery(nn.Module):
    """A query map ``x -> x + up(down(x)) + bias``: the identity plus a trained rank-``r`` update.

    Replaces the dense ``d x d`` query map where communication matters: ``2 r d + d``
    parameters instead of ``d^2 + d``. Starts at the identity (``up = 0``, ``down`` random
    with unit-variance rows over ``d``, as LoRA), like the dense map. FedAvg averages the
    two factors separately (as federated LoRA does), which is not the average of their
    products; the query map is trained only through the retrieval regulariser, so its
    update is small and this matters little (measured in experiments/README.md).

    Attributes:
        down: ``(r, d)``.
        up: ``(d, r)``, zero at the start.
        bias: ``(d,)``, zero at the start.
    """

    def __init__(self, dim: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        if not 0 < rank < dim:
            raise ValueError(f"query rank {rank} must lie in 1..{dim - 1} (the width is {dim}); 0 means dense")
        self.down = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, d)``."""
        return x + (x @ self.down.t()) @ self.up.t() + self.bias


def query_map(dim: int, rank: int, generator: torch.Generator | None = None) -> nn.Module:
    """A prompt pool's query map: dense, initialised to the identity (``rank = 0``), or :class:`LowRankQuery`."""
    if rank > 0:
        return LowRankQuery(dim, rank, generator if generator is not None else torch.Generator().manual_seed(0))
    dense = nn.Linear(dim, dim)
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dim))
        dense.bias.zero_()
    return dense


def query_parameter_count(dim: int, rank: int) -> int:
    """Parameters of one query map: ``d^2 + d`` dense, ``2 r d + d`` at rank ``r``."""
    return dim * dim + dim if rank == 0 else 2 * rank * dim + dim


class LowRankLinear(nn.Module):
    """A linear map of rank ``r``: ``x -> (x @ down.T) @ up.T + bias`` (``d_in -> d_out``).

    Takes the place of the head's ``d -> 2d`` layer where communication matters:
    ``r (d_in + d_out) + d_out`` parameters instead of ``d_in d_out + d_out`` (at ``d = 768``,
    ``r = 16``: 38,400 instead of 1,181,184). The classifier after it reads ``C`` classes, and a
    linear classifier has rank at most ``C``, so ``r >= C`` keeps every linear readout of the
    pooled feature representable. Both factors are trained and averaged separately (FedAvg of
    factors, as for :class:`LowRankQuery`). Initialised so that the entries of ``up @ down``
    have the dense layer's standard deviation ``std`` (each factor ``sqrt(std / sqrt(r))``).

    Attributes:
        down: ``(r, d_in)``.
        up: ``(d_out, r)``.
        bias: ``(d_out,)``, zero at the start.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, generator: torch.Generator, std: float = 0.02
    ) -> None:
        super().__init__()
        if not 0 < rank < min(in_features, out_features):
            raise ValueError(
                f"head rank {rank} must lie in 1..{min(in_features, out_features) - 1} "
                f"(the layer is {in_features} -> {out_features}); 0 means dense"
            )
        scale = math.sqrt(std / math.sqrt(rank))
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=generator) * scale)
        self.up = nn.Parameter(torch.randn(out_features, rank, generator=generator) * scale)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d_in) -> (B, d_out)``."""
        return (x @ self.down.t()) @ self.up.t() + self.bias


class LowRankPooler(nn.Module):
    """A frozen pooler plus a trained rank-``r`` update: ``x -> x @ (weight + up @ down).T + bias``.

    ``weight`` ``(d, d)`` is the backbone's pretrained pooler (a buffer: never trained, never
    exchanged; every process builds the same one); the update starts at zero (``up = 0``,
    ``down`` random with unit-variance rows over ``d``, as LoRA) and the bias at the pretrained
    bias. ``2 r d + d`` parameters travel instead of ``d^2 + d``. A frozen pooler alone cost
    fedprime 5-7 points on the alignment grid (experiments/README.md); the update lets the
    pooled feature follow the prompts at a small share of the bytes.

    Attributes:
        weight: ``(d, d)`` buffer.
        down: ``(r, d)``.
        up: ``(d, r)``, zero at the start.
        bias: ``(d,)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        dim = weight.shape[1]
        if not 0 < rank < dim:
            raise ValueError(f"pooler rank {rank} must lie in 1..{dim - 1} (the width is {dim}); 0 means dense")
        self.register_buffer("weight", weight.detach().clone())
        self.down = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank))
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, d)`` (before the tanh)."""
        return x @ self.weight.t() + (x @ self.down.t()) @ self.up.t() + self.bias


class PromptPool(nn.Module):
    """``tau`` prompts with learnable keys and a query map.

    Attributes:
        prompts: ``(tau, length, d)``, uniform with root-mean-square entry ``scale``, the
            scale of the backbone's token embedding table (:meth:`Backbone.token_scale`):
            prompts are learned token embeddings, and at that scale local training moves
            them by a real fraction of the distance between them (what the inter-prompt
            alignment needs; at ``U(-1, 1)`` they barely move).
        keys: ``(tau, d)``, initialised the same way.
        query: ``d -> d`` map applied to the prompt-free input summary, initialised to the
            identity (so retrieval starts from the frozen summary as in L2P): dense, or the
            identity plus a rank-``query_rank`` update (:class:`LowRankQuery`, its random
            factor drawn from ``query_generator``, so the prompts and keys are the same
            as the dense pool's for the same ``generator``).
    """

    def __init__(
        self,
        size: int,
        length: int,
        dim: int,
        generator: torch.Generator,
        scale: float = 1.0,
        query_rank: int = 0,
        query_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = math.sqrt(3.0) * scale  # U(-b, b) has RMS b / sqrt(3)
        self.prompts = nn.Parameter((torch.rand(size, length, dim, generator=generator) * 2 - 1) * bound)
        self.keys = nn.Parameter((torch.rand(size, dim, generator=generator) * 2 - 1) * bound)
        self.query = query_map(dim, query_rank, query_generator)

    @property
    def size(self) -> int:
        return self.prompts.shape[0]

    def resize(self, size: int) -> None:
        """Change the number of prompts (the aggregated inter pool varies between rounds)."""
        if size == self.size:
            return
        device, dtype = self.prompts.device, self.prompts.dtype
        self.prompts = nn.Parameter(torch.zeros(size, *self.prompts.shape[1:], device=device, dtype=dtype))
        self.keys = nn.Parameter(torch.zeros(size, self.keys.shape[1], device=device, dtype=dtype))

    def forward(self, summary: torch.Tensor, kappa: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Retrieve prompts for a batch.

        Args:
            summary: ``(B, d)`` prompt-free summary of each input.
            kappa: prompts per sample.
            mode: ``"sample"`` or ``"batch"`` selection.

        Returns:
            tokens ``(B, kappa * length, d)``, selected indices ``(B, kappa)``, regulariser.
        """
        relevance = cosine_relevance(self.query(summary), self.keys)
        selected = select_prompts(relevance, kappa, mode)
        tokens = self.prompts[selected].flatten(1, 2)
        return tokens, selected, retrieval_regulariser(relevance, selected)


class PFPTPromptPool(nn.Module):
    """L2P's prompt pool as PFPT's code builds it (``Models/L2P_heuristic_model.py``, ``Pool``).

    * The prompt is its own key: relevance is ``cos(query(x), k)`` with ``k`` the prompt
      (the mean of its tokens when ``length > 1``); there are no separate keys.
    * The query input is the frozen backbone's prompt-free [CLS] feature (a no-grad forward
      without prompts, computed by :class:`PromptedModel`), through a linear map without
      bias (PFPT's ``features_proj``, initialised uniform in ``[-1, 1]``).
    * Prompts start uniform in ``[-v, v]``, ``v = sqrt(6 / (3 * 32 * 32 + d))`` (PFPT's
      ``'uniform'`` initialisation with its patch size 32; about 0.044 at ``d = 768``).

    Retrieval (per-sample top-kappa or the reference's batch rule) and the regulariser
    (``lambda * mean(1 - cos)``, pulling the selected prompts towards their queries) are the
    project's, as for :class:`PromptPool`; PFPT's code adds ``+cos`` instead, which pushes
    them away (the same sign defect as the FedPrime reference).

    Attributes:
        prompts: ``(tau, length, d)``.
        query: ``d -> d`` linear map, no bias.
    """

    def __init__(self, size: int, length: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * 32 * 32 + dim))
        self.prompts = nn.Parameter((torch.rand(size, length, dim, generator=generator) * 2 - 1) * bound)
        self.query = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.query.weight.copy_(torch.rand(dim, dim, generator=generator) * 2 - 1)

    @property
    def size(self) -> int:
        return self.prompts.shape[0]

    @property
    def keys(self) -> torch.Tensor:
        """``(tau, d)``: each prompt is its own key."""
        return self.prompts.mean(1)

    def resize(self, size: int) -> None:
        """Change the number of prompts (PFPT's global pool varies between rounds)."""
        if size == self.size:
            return
        device, dtype = self.prompts.device, self.prompts.dtype
        self.prompts = nn.Parameter(torch.zeros(size, *self.prompts.shape[1:], device=device, dtype=dtype))

    def forward(self, summary: torch.Tensor, kappa: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`PromptPool.forward`, with ``summary`` the frozen [CLS] feature ``(B, d)``."""
        relevance = cosine_relevance(self.query(summary), self.keys)
        selected = select_prompts(relevance, kappa, mode)
        tokens = self.prompts[selected].flatten(1, 2)
        return tokens, selected, retrieval_regulariser(relevance, selected)


class MissingAwarePrompts(nn.Module):
    """One prompt set per missing pattern, inserted at blocks ``0..depth-1`` (Lee et al., CVPR 2023).

    Attributes:
        prompts: ``(3, depth, length, d)``; pattern 0 complete, 1 text missing, 2 image missing.
    """

    #: ``init="reference"``: the token set to ones for each pattern (complete, text missing, image
    #: missing), as in the reference code and Lee et al.'s.
    REFERENCE_ONES = (0, 2, 1)

    def __init__(self, depth: int, length: int, dim: int, generator: torch.Generator, init: str = "normal") -> None:
        """``init``: ``"normal"`` N(0, 0.02); ``"reference"`` zeros with token ``REFERENCE_ONES[pattern]``
        (when ``length`` has it) all ones, for comparison only. The normal draw is taken from
        ``generator`` either way, so every later part of the model starts the same for one seed."""
        super().__init__()
        if init not in MAP_PROMPT_INITS:
            choices = " or ".join(repr(choice) for choice in MAP_PROMPT_INITS)
            raise ValueError(f"missing-aware prompt init must be {choices}, got {init!r}")
        drawn = torch.randn(NUM_PATTERNS, depth, length, dim, generator=generator) * 0.02
        if init == "reference":
            drawn = torch.zeros_like(drawn)
            for pattern, token in enumerate(self.REFERENCE_ONES):
                if token < length:
                    drawn[pattern, :, token] = 1.0
        self.prompts = nn.Parameter(drawn)

    def forward(self, missing_type: torch.Tensor) -> dict[int, torch.Tensor]:
        """Block index -> prompts ``(B, length, d)`` chosen by each sample's known pattern."""
        chosen = self.prompts[missing_type]  # (B, depth, length, d)
        return {layer: chosen[:, layer] for layer in range(chosen.shape[1])}


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` ``(B, L, d)`` over positions where ``mask`` ``(B, L)`` is 1: ``(B, d)``."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class PromptedModel(nn.Module):
    """Frozen backbone + prompts + pooler + head, for every method of the paper.

    Args:
        backbone: the frozen backbone.
        spec: the method (which pools, missing-aware prompts).
        num_classes: outputs of the head.
        prompts: pool sizes, retrieval and the query maps' rank.
        seed: seeds every initialisation (the low-rank query factors from their own
            generator, so the rest is initialised as with dense query maps).
        train_pooler: ``False`` keeps the backbone's pretrained pooler frozen, so it is
            neither trained nor exchanged (``exchange-pooler=false``); needs a backbone
            with a pretrained pooler.
        head_rank: 0 a dense head (the reference); ``r > 0`` its first layer a
            :class:`LowRankLinear` (``head-rank``).
        pooler_rank: 0 the pooler trained whole (or frozen, ``train_pooler=False``); ``r > 0``
            a :class:`LowRankPooler` over the pretrained pooler (``pooler-rank``; needs
            ``train_pooler``).
        readout: ``"cls"`` the pooler reads the [CLS] token's final state; ``"first-prompt"``
            the first retrieval prompt's (the first pool's most relevant prompt; the reference's
            Fed-Inter and Fed-Prime, comparison only); needs a retrieval pool.
        pooler_init: ``"pretrained"`` the pooler starts from the backbone's pretrained pooler
            where it has one; ``"random"`` from N(0, 0.02) with zero bias whatever the backbone
            (the reference code's models, comparison only); needs ``train_pooler``.

    The low-rank factors of the head and pooler are drawn from their own generator, so every
    other part starts as in the dense model of the same seed.
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: MethodSpec,
        num_classes: int,
        prompts: PromptSettings = PromptSettings(),
        seed: int = 0,
        train_pooler: bool = True,
        head_rank: int = 0,
        pooler_rank: int = 0,
        readout: str = "cls",
        pooler_init: str = "pretrained",
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout {readout!r} is not one of {READOUTS}")
        if readout == "first-prompt" and not spec.pools:
            raise ValueError(f"readout 'first-prompt' reads a retrieved prompt; method {spec.name!r} has no pool")
        self.readout = readout
        if pooler_init not in POOLER_INITS:
            raise ValueError(f"pooler_init {pooler_init!r} is not one of {POOLER_INITS}")
        if pooler_init == "random" and not train_pooler:
            raise ValueError("pooler_init 'random' with train_pooler=False would keep a random pooler frozen")
        self.pooler_init = pooler_init
        if pooler_rank and not train_pooler:
            raise ValueError(
                f"pooler rank {pooler_rank} trains an update of the pooler, which train_pooler=False keeps frozen "
                "(exchange-pooler=false); set pooler-rank=0 or exchange-pooler=true"
            )
        if not train_pooler and backbone.pooler_init() is None:
            raise ValueError(
                f"exchange-pooler=false keeps the backbone's pretrained pooler frozen, but "
                f"{type(backbone).__name__} has no pretrained pooler (it would be a frozen random map); "
                "set exchange-pooler=true"
            )
        if prompts.kappa > prompts.tau:
            raise ValueError(f"kappa ({prompts.kappa}) must not exceed tau ({prompts.tau})")
        generator = torch.Generator().manual_seed(seed)
        query_generator = torch.Generator().manual_seed(seed + 1)
        dim = backbone.hidden_size
        self.backbone = backbone
        self.spec = spec
        self.settings = prompts
        self.num_classes = num_classes
        scale = backbone.token_scale()
        self.pools = nn.ModuleDict(
            {
                name: PromptPool(
                    prompts.tau, prompts.length, dim, generator, scale, prompts.query_rank, query_generator
                )
                for name in spec.pools
            }
        )
        if spec.pool_variant == "pfpt":  # PFPT's L2P pools take the place of the keyed ones
            self.pools = nn.ModuleDict(
                {name: PFPTPromptPool(prompts.tau, prompts.length, dim, generator) for name in spec.pools}
            )
        self.map_prompts = (
            MissingAwarePrompts(
                min(prompts.map_depth, backbone.num_layers), prompts.map_length, dim, generator, prompts.map_init
            )
            if spec.missing_aware
            else None
        )
        factor_generator = torch.Generator().manual_seed(seed + 2)
        # Modules are created, and registered, in the reference's order (pooler, head).
        dense_pooler = None if pooler_rank else nn.Linear(dim, dim)
        first: nn.Module = (
            LowRankLinear(dim, 2 * dim, head_rank, factor_generator) if head_rank else nn.Linear(dim, 2 * dim)
        )
        head = nn.Sequential(first, nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, num_classes))
        self.pooler = self._init_pooler_and_head(dim, dense_pooler, head, generator, factor_generator, pooler_rank)
        self.pooler.requires_grad_(train_pooler)
        self.head = head

    def _init_pooler_and_head(
        self,
        dim: int,
        dense_pooler: nn.Linear | None,
        head: nn.Sequential,
        generator: torch.Generator,
        factor_generator: torch.Generator,
        pooler_rank: int,
    ) -> nn.Module:
        """Initialise the head's dense layers and return the pooler (dense, or :class:`LowRankPooler`).

        The pooler starts from the backbone's pretrained pooler where it has one (unless
        ``pooler_init="random"``: then from its own N(0, 0.02) draw, zero bias). The dense
        layers' weights are drawn from ``generator`` in the reference's order (pooler, head
        ``d -> 2d``, head ``2d -> C``) whether or not a layer is low-rank, so the parts that
        a dense and a low-rank model share start identical for one seed (the paired
        comparisons of the profiles rely on it).
        """
        pretrained = self.backbone.pooler_init()
        with torch.no_grad():
            pooler_weight = torch.empty(dim, dim).normal_(0.0, 0.02, generator=generator)
            pooler_bias = torch.zeros(dim)
            for module in (head[0], head[3]):
                shape = (2 * dim, dim) if module is head[0] else tuple(module.weight.shape)
                weight = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
                if isinstance(module, nn.Linear):
                    module.weight.copy_(weight)
                    module.bias.zero_()
            if pretrained is not None and self.pooler_init == "pretrained":
                pooler_weight, pooler_bias = pretrained["weight"], pretrained["bias"]
            if dense_pooler is None:
                return LowRankPooler(pooler_weight, pooler_bias, pooler_rank, factor_generator)
            dense_pooler.weight.copy_(pooler_weight)
            dense_pooler.bias.copy_(pooler_bias)
        return dense_pooler

    # -- forward ---------------------------------------------------------------------
    def forward(self, batch: Batch) -> PromptedOutput:
        """Classify a batch. See the module docstring for the token layout."""
        tokens, mask = self.backbone.embed(batch)
        selected: dict[str, torch.Tensor] = {}
        regulariser = tokens.new_zeros(())
        prefix = []
        if self.pools:
            summary = masked_mean(tokens, mask).detach()
            if self.spec.pool_variant == "pfpt":  # L2P's query input: the frozen, prompt-free [CLS] feature
                with torch.no_grad():
                    summary = self.backbone.encode(tokens, mask)[:, 0]
            for name, pool in self.pools.items():
                pool_tokens, selected[name], reg = pool(summary, self.settings.kappa, self.settings.selection)
                prefix.append(pool_tokens)
                regulariser = regulariser + reg
        layer_prompts = self.map_prompts(batch["missing_type"]) if self.map_prompts is not None else None
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            tokens = torch.cat([prefix_tokens, tokens], dim=1)
            ones = torch.ones(prefix_tokens.shape[:2], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
        # Final layout: [block-k prompts ... block-0 prompts | retrieval prompts | tokens].
        cls_index = 0 if self.readout == "first-prompt" else sum(p.shape[1] for p in prefix)
        if layer_prompts:
            cls_index += sum(p.shape[1] for p in layer_prompts.values())
        hidden = self.backbone.encode(tokens, mask, layer_prompts)
        pooled = torch.tanh(self.pooler(hidden[:, cls_index]))
        return PromptedOutput(self.head(pooled), regulariser, selected)

    # -- exchanged state -------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter by exchange name; the frozen backbone is never included."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters in groups whose gradients are clipped separately.

        Each pool's prompts; each pool's retrieval (keys and query map); the missing-aware
        prompts; everything else (pooler, head, backbone-owned trainables). Clipping the
        whole set at once lets the head's large gradient scale the prompts' down to nothing.
        """
        groups: dict[str, list[nn.Parameter]] = {}
        taken: set[int] = set()
        for name, pool in self.pools.items():
            groups[f"pools.{name}.prompts"] = [pool.prompts]
            # PFPT's pool has no keys of its own (a prompt is its key): only parameters are clipped.
            keys = [pool.keys] if isinstance(pool.keys, nn.Parameter) else []
            groups[f"pools.{name}.retrieval"] = [*keys, *pool.query.parameters()]
        if self.map_prompts is not None:
            groups["map_prompts"] = list(self.map_prompts.parameters())
        for params in groups.values():
            taken.update(id(p) for p in params)
        groups["head"] = [p for p in self.trainable_parameters().values() if id(p) not in taken]
        return {name: params for name, params in groups.items() if params}


def trainable_state(model: PromptedModel) -> dict[str, np.ndarray]:
    """The arrays a client sends and the server aggregates: ``name -> float32 array``."""
    return {
        name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in model.trainable_parameters().items()
    }


def load_trainable_state(model: PromptedModel, state: Mapping[str, np.ndarray]) -> None:
    """Load exchanged arrays into ``model``, resizing prompt pools whose size changed.

    Raises:
        ValueError: if a name is missing or unexpected, or a shape does not fit.
    """
    for name, pool in model.pools.items():
        key = f"pools.{name}.prompts"
        if key in state:
            pool.resize(int(np.shape(state[key])[0]))
    params = model.trainable_parameters()
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(np.asarray(state[name]), dtype=param.dtype)
            if value.shape != param.shape:
                raise ValueError(f"array {name!r} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
            param.copy_(value.to(param.device))


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Total bytes of a state's arrays."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))
