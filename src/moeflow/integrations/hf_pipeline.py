"""Hugging Face causal LMs as pipeline stages: :func:`pipeline_parts`.

A transformers ``*ForCausalLM`` (DeepSeek-V3, Qwen3-MoE, Mixtral, ... after
:func:`moeflow.integrations.hf.expert_parallelize`) keeps its decoder in ``model.model``:
``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``, and the head in ``model.lm_head``. The
model's own forward computes the rotary embeddings and the causal mask once and hands them to
every layer; a pipeline stage receives only the hidden states, so each layer here recomputes
them from the hidden states' shape (positions ``0..Q-1``, no padding mask: full sequences, as
in pre-training). The rotary tables are small (``[Q, head_dim]``); the mask is None with SDPA.

This module imports transformers only when called (the ``hf`` extra).
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel.pipeline import ModelParts

__all__ = ["pipeline_parts"]


class _DecoderLayer(nn.Module):
    """One decoder layer that takes only ``[B, Q, H]`` hidden states."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config):
        super().__init__()
        self.layer, self.rotary_emb, self.config = layer, rotary_emb, config

    def forward(self, hidden_BQH: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        Q = hidden_BQH.size(1)
        position_ids = torch.arange(Q, device=hidden_BQH.device).unsqueeze(0)
        mask_fn = create_sliding_window_causal_mask if getattr(self.config, "sliding_window", None) else create_causal_mask
        mask = mask_fn(config=self.config, inputs_embeds=hidden_BQH, attention_mask=None, cache=None,
                       position_ids=position_ids)
        out = self.layer(hidden_BQH, attention_mask=mask, position_ids=position_ids,
                         position_embeddings=self.rotary_emb(hidden_BQH, position_ids=position_ids))
        return out[0] if isinstance(out, tuple) else out


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden_BQH: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_BQH))  # [B, Q, V]


def pipeline_parts(model: nn.Module) -> ModelParts:
    """``model`` (a transformers causal LM) as :class:`moeflow.parallel.pipeline.ModelParts`.

    The parts are the model's own modules. Raises ``ValueError`` for a model whose input
    embedding and output head are tied (they would sit on different stages) or that lacks the
    standard decoder layout.
    """
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, a)]
    if config is None or missing or not hasattr(model, "lm_head"):
        raise ValueError(f"pipeline_parts: {type(model).__name__} is not a transformers causal LM with the standard "
                         f"decoder layout (model.model.{{embed_tokens, layers, norm, rotary_emb}}, model.lm_head); "
                         f"missing: {missing or ['lm_head']}")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(f"pipeline_parts: {type(model).__name__} ties its input embedding and output head "
                         "(tie_word_embeddings=True); they would sit on different pipeline stages")
    layers = tuple(_DecoderLayer(layer, inner.rotary_emb, config) for layer in inner.layers[:config.num_hidden_layers])
    return ModelParts(embed=inner.embed_tokens, layers=layers, head=_Head(inner.norm, model.lm_head),
                      hidden=config.hidden_size, output_size=config.vocab_size,
                      dtype=next(model.parameters()).dtype)
