"""The frozen-backbone interface that prompts, retrieval, heads and aggregators are written against.

A backbone turns a batch into a token sequence, and runs its frozen encoder over
``[prompts | tokens]``. Everything it owns is frozen; the prompted model adds the only
trainable parts. An implementation may expose a small set of trainable modules of its
own (for example a projection of precomputed image features into the encoder width);
those are named by :meth:`Backbone.trainable_modules` and travel like the head.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

#: A batch as produced by :func:`fedprime_core.data.processing.collate`.
Batch = Mapping[str, torch.Tensor]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a 0/1 key mask into the additive attention mask of BERT-style encoders.

    Args:
        mask: ``(B, L)`` with 1 for tokens that may be attended to.
        dtype: dtype of the attention scores.

    Returns:
        ``(B, 1, 1, L)``: 0 where ``mask`` is 1, the dtype's most negative value elsewhere.
    """
    inverted = 1.0 - mask[:, None, None, :].to(dtype)
    return inverted * torch.finfo(dtype).min


class Backbone(nn.Module, abc.ABC):
    """A frozen multimodal encoder that accepts prompt tokens.

    Attributes:
        hidden_size: width ``d`` of every token.
        num_layers: number of transformer blocks.
    """

    hidden_size: int
    num_layers: int

    @abc.abstractmethod
    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch into tokens.

        Returns:
            tokens ``(B, L, d)`` and mask ``(B, L)`` (1 = real token). Token 0 is the
            sequence's [CLS] token, whose final state feeds the pooler.
        """

    @abc.abstractmethod
    def run_layer(self, index: int, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Run block ``index`` on ``hidden`` ``(B, L, d)`` with additive mask ``(B,1,1,L)``."""

    @abc.abstractmethod
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's output normalisation (identity if it has none)."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Backbone-owned modules that are trained and exchanged (none by default)."""
        return {}

    def pooler_init(self) -> dict[str, torch.Tensor] | None:
        """Pretrained pooler weights (``weight``, ``bias``) to start the trainable pooler from."""
        return None

    def token_scale(self) -> float:
        """Root-mean-square entry of the backbone's token embedding table: prompts start at this scale.

        Prompts are learned token embeddings, so they start where the vocabulary's embeddings
        live (about 0.05 per entry for BERT-family tables, the scale of the reference code's
        small uniform initialisation), not at ``U(-1, 1)``. The block-0 LayerNorm makes a
        prompt's gradient inversely proportional to its norm, so this is also what lets local
        training move prompts by a real fraction of the distance between them.
        The default measures the first ``nn.Embedding`` of the backbone.
        """
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                return float(module.weight.detach().float().pow(2).mean().sqrt())
        raise NotImplementedError(f"{type(self).__name__} has no token embedding table; override token_scale()")

    def encode(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        layer_prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the frozen encoder, prepending prompts where asked.

        Args:
            tokens: ``(B, L, d)`` input tokens (prompts for block 0 already prepended
                by the caller, or passed in ``layer_prompts[0]``).
            mask: ``(B, L)`` 0/1 key mask of ``tokens``.
            layer_prompts: block index -> prompts ``(B, P_i, d)`` prepended to the hidden
                states right before that block (missing-aware prompts insert at blocks 0-5;
                prompts accumulate, as in Lee et al. 2023).

        Returns:
            ``(B, sum_i P_i + L, d)`` final hidden states after the output norm; the
            prompts of the deepest block come first.
        """
        hidden, key_mask = tokens, mask
        for index in range(self.num_layers):
            if layer_prompts and index in layer_prompts:
                prompts = layer_prompts[index]
                hidden = torch.cat([prompts, hidden], dim=1)
                ones = torch.ones(prompts.shape[:2], dtype=key_mask.dtype, device=key_mask.device)
                key_mask = torch.cat([ones, key_mask], dim=1)
            hidden = self.run_layer(index, hidden, additive_mask(key_mask, hidden.dtype))
        return self.final_norm(hidden)

    def freeze(self) -> None:
        """Freeze every parameter except :meth:`trainable_modules` and switch off dropout."""
        trainable = {id(p) for m in self.trainable_modules().values() for p in m.parameters()}
        for param in self.parameters():
            param.requires_grad_(id(param) in trainable)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # The frozen encoder always runs in eval mode (no dropout), whatever the caller asks.
        super().train(False)
        for module in self.trainable_modules().values():
            module.train(mode)
        return self


def resolve_pretrained_source(model: str) -> str:
    """A local ``save_pretrained`` directory or a hub id, as ``from_pretrained`` accepts it.

    An existing directory must hold a ``config.json``; a value that looks like a path
    (``/``, ``./``, ``../``, ``~``) must exist. Anything else is a hub id, resolved
    through the HF cache (``HF_HOME``, ``HF_HUB_OFFLINE`` apply).

    Raises:
        FileNotFoundError: naming the directory and what to point ``model`` at instead.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no config.json; point 'model' at a directory "
                "written by save_pretrained (or a HF snapshot folder) or use a hub id"
            )
        return str(path)
    if model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    return model
