"""What each method is, in one table: which prompt pools, how each is aggregated."""

from __future__ import annotations

import dataclasses

#: How ``pfpt``'s aggregation schedules its Adam steps (:mod:`fedprime_core.method.pfpt`): one per
#: client per sweep (PFPT's code, the default), or one per sweep over every client's terms.
PFPT_STEPS = ("per-client", "per-sweep")
#: How a sample picks its prompts (:func:`fedprime_core.method.retrieval.select_prompts`): its own
#: top-kappa, or the reference's batch-majority rule (comparison only).
SELECTIONS = ("sample", "batch")
#: How the missing-aware prompts start: N(0, 0.02) (ours), or the reference's (Lee et al.'s) zeros
#: with one all-ones token per pattern (comparison only: docs/findings/reference-code.md, D4).
MAP_PROMPT_INITS = ("normal", "reference")
#: What the pooler reads: the final state of the [CLS] token (ours, every method), or of the first
#: retrieved prompt, as the reference's Fed-Inter and Fed-Prime do (comparison only: D5).
READOUTS = ("cls", "first-prompt")
#: How the pooler starts: from the backbone's pretrained pooler where it has one (ours), or drawn
#: N(0, 0.02) like the head, as the reference code's models do (comparison only: D4).
POOLER_INITS = ("pretrained", "random")
#: The local optimizers (:func:`fedprime_core.method.training.make_optimizer`).
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """The model variant and aggregation rule of one method.

    Attributes:
        name: the ``method`` config value.
        pools: retrieval prompt pools, in the order their prompts are prepended.
        aligned_pools: pools aggregated by prompt alignment instead of FedAvg.
        aligner: ``"fedprime"`` (clustering-alignment, learned popularity, warm start) or
            ``"pfpt"`` (PFPT's probabilistic set aggregation, :mod:`fedprime_core.method.pfpt`).
        pool_variant: the retrieval pool's client model: ``"keyed"``
            (:class:`~fedprime_core.method.model.PromptPool`: learned keys, a query over the mean-pooled
            input embeddings) or ``"pfpt"`` (:class:`~fedprime_core.method.model.PFPTPromptPool`: L2P
            as PFPT's code builds it, the prompt is its own key and the query projects the
            frozen, prompt-free [CLS] feature).
        missing_aware: one prompt set per missing pattern at blocks 0..depth-1 (Lee et al.).
        proximal: add the FedProx term to the local loss.
        centralized: one data owner holds the union of the clients' data.
    """

    name: str
    pools: tuple[str, ...] = ()
    aligned_pools: tuple[str, ...] = ()
    aligner: str | None = None
    pool_variant: str = "keyed"
    missing_aware: bool = False
    proximal: bool = False
    centralized: bool = False
    description: str = ""

    @property
    def personalised_pools(self) -> tuple[str, ...]:
        """Pools every client keeps across rounds, aggregated by FedPrime's protocol
        (:mod:`fedprime_core.method.interpool`): the pools the ``fedprime`` aligner merges."""
        return self.aligned_pools if self.aligner == "fedprime" else ()


METHOD_SPECS: dict[str, MethodSpec] = {
    "fedprime": MethodSpec(
        "fedprime",
        ("intra", "inter"),
        ("inter",),
        "fedprime",
        description="both pools; intra by FedAvg, inter by clustering-alignment",
    ),
    "fed-intra": MethodSpec(
        "fed-intra",
        ("intra",),
        description="one L2P pool, plain FedAvg (ablation)",
    ),
    "fed-inter": MethodSpec(
        "fed-inter",
        ("inter",),
        ("inter",),
        "fedprime",
        description="one pool, clustering-alignment only (ablation)",
    ),
    "fedavg-p": MethodSpec(
        "fedavg-p",
        missing_aware=True,
        description="missing-aware prompts (one set per missing pattern, blocks 0-5), FedAvg",
    ),
    "pfpt": MethodSpec(
        "pfpt",
        ("inter",),
        ("inter",),
        "pfpt",
        pool_variant="pfpt",
        description="PFPT: one L2P pool (prompt = key, frozen [CLS] query), probabilistic set aggregation",
    ),
    "fedprox-p": MethodSpec(
        "fedprox-p",
        ("intra", "inter"),
        ("inter",),
        "fedprime",
        proximal=True,
        description="fedprime + proximal term mu/2 ||w - w_global||^2",
    ),
    "centralized-p": MethodSpec(
        "centralized-p",
        ("intra", "inter"),
        centralized=True,
        description="the fedprime model trained by one owner of all data (upper reference)",
    ),
}


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; raises ``ValueError`` listing the known methods."""
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; use one of: {', '.join(METHOD_SPECS)}") from None


def default_sweeps(method: str) -> int:
    """Alignment sweeps used when ``align-sweeps`` is 0 (reference: FedPrime 5, PFPT 50)."""
    return 50 if method_spec(method).aligner == "pfpt" else 5
