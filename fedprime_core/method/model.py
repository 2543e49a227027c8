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
  exchanged unless ``train_pooler=False`` keeps it frozen) and
  ``head`` (``d -> 2d -> LayerNorm -> GELU -> C``, as in the reference);
* whatever the backbone names in ``trainable_modules()`` (e.g. an image-feature projection).

Retrieval prompts are input tokens prepended once before block 0, in pool order
(``[intra kappa | inter kappa | text | image]``), without position or type embeddings and
with attention mask 1. The pooler reads the final state of the sequence's [CLS] token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone, Batch
from ..config import RunConfig
from .methods import MethodSpec
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
    query_rank: int = 0
    """0: dense query maps; r > 0: identity plus a rank-r update (:class:`LowRankQuery`). Keyed pools
    only: :class:`PFPTPromptPool` keeps PFPT's dense projection."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PromptSettings:
        """The prompt sizes of a run."""
        return cls(
            tau=cfg.tau,
            kappa=cfg.kappa,
            length=cfg.prompt_length,
            selection=cfg.selection,
            map_length=cfg.map_prompt_length,
            map_depth=cfg.map_prompt_depth,
            query_rank=cfg.query_rank,
        )


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

    def __init__(self, depth: int, length: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(NUM_PATTERNS, depth, length, dim, generator=generator) * 0.02)

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
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: MethodSpec,
        num_classes: int,
        prompts: PromptSettings = PromptSettings(),
        seed: int = 0,
        train_pooler: bool = True,
    ) -> None:
        super().__init__()
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
            MissingAwarePrompts(min(prompts.map_depth, backbone.num_layers), prompts.map_length, dim, generator)
            if spec.missing_aware
            else None
        )
        self.pooler = nn.Linear(dim, dim)
        self.head = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, num_classes)
        )
        self._init_trainable(generator, train_pooler)

    def _init_trainable(self, generator: torch.Generator, train_pooler: bool) -> None:
        pretrained = self.backbone.pooler_init()
        if pretrained is None and not train_pooler:
            raise ValueError(
                f"exchange-pooler=false keeps the backbone's pretrained pooler frozen, but "
                f"{type(self.backbone).__name__} has no pretrained pooler (it would be a frozen random map); "
                "set exchange-pooler=true"
            )
        with torch.no_grad():
            for module in (self.pooler, self.head[0], self.head[3]):
                module.weight.normal_(0.0, 0.02, generator=generator)
                module.bias.zero_()
            if pretrained is not None:
                self.pooler.weight.copy_(pretrained["weight"])
                self.pooler.bias.copy_(pretrained["bias"])
        self.pooler.requires_grad_(train_pooler)

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
        cls_index = sum(p.shape[1] for p in prefix)
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
