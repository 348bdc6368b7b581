"""Context encoding: passages -> encoder states, query-independent, storable and reusable.

The encoder is any Hugging Face encoder: a bidirectional Llama (the paper's LLaMA-MLM-Large layout)
or a BERT-family model such as MiniLM. Every chunk is encoded on its own, with positions 0..len-1;
all chunks of all requests go through the encoder as one right-padded batch.
"""

from __future__ import annotations

import torch
from torch import nn


def build_encoder(encoder_config: dict) -> nn.Module:
    """An encoder model from its config dict (random weights; a checkpoint fills them)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**encoder_config)
    if config.model_type == "llama":
        config.is_causal = False  # transformers then builds a bidirectional mask
        config.is_decoder = False
    model = AutoModel.from_config(config)
    make_bidirectional(model)
    return model


def make_bidirectional(model: nn.Module) -> None:
    """A Llama-style model attends both ways when its config and every attention module say so."""
    if getattr(model.config, "model_type", "") in ("llama", "mistral", "qwen2"):
        model.config.is_causal = False
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False


def encode_chunks(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  all_states: bool = False) -> torch.Tensor:
    """(chunks, length) right-padded token ids -> (chunks, length, hidden) last hidden states, or with
    `all_states` (chunks, layers + 1, length, hidden): the embeddings, then every layer's output (the last
    one after the final norm, as `output_hidden_states` gives them)."""
    if input_ids.shape[-1] == 0:
        return torch.zeros((*input_ids.shape, encoder.config.hidden_size), device=input_ids.device)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    kwargs = {"position_ids": positions}
    if getattr(encoder.config, "model_type", "") in ("llama", "mistral", "qwen2"):
        kwargs["use_cache"] = False
    output = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_states, **kwargs)
    return torch.stack(output.hidden_states, dim=1) if all_states else output.last_hidden_state
