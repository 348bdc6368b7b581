"""Context encoding: passages -> encoder states, query-independent, storable and reusable.

The encoder is any Hugging Face encoder: a bidirectional Llama (the paper's LLaMA-MLM-Large layout)
or a BERT-family model such as MiniLM. Every chunk is encoded on its own, with positions 0..len-1;
all chunks of all requests go through the encoder as one right-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cepe_rag.types import CepeRagError

STATES_FORMAT = "cepe-context-states"


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


@dataclass
class ContextStates:
    """Encoder output for a set of passages: one (tokens, hidden) tensor per passage (or (n_states, tokens,
    hidden) for models reading several encoder layers), keyed by passage id."""

    ids: list[int]
    states: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hidden_size(self) -> int:
        return self.states[0].shape[-1] if self.states else 0

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    def tokens(self) -> int:
        return sum(s.shape[-2] for s in self.states)

    def states_for(self, passages) -> dict[int, torch.Tensor]:
        """The states of these passages that this set holds, by passage id (the CEPE reader's state source)."""
        by_id = dict(zip(self.ids, self.states))
        return {p.id: by_id[p.id] for p in passages if p.id in by_id}

    def select(self, ids: list[int]) -> list[torch.Tensor]:
        by_id = dict(zip(self.ids, self.states))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"no context states for passage ids {missing[:5]}")
        return [by_id[i] for i in ids]

    def to(self, device=None, dtype=None) -> ContextStates:
        return ContextStates(self.ids, [s.to(device=device, dtype=dtype) for s in self.states])

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float16, encoder: str = "") -> None:
        """One safetensors file: all states concatenated, with per-passage ids and lengths."""
        lengths = torch.tensor([s.shape[-2] for s in self.states], dtype=torch.int64)
        flat = torch.cat(self.states, dim=-2) if self.states else torch.zeros((0, 0))
        tensors = {"states": flat.to(dtype).contiguous(), "lengths": lengths,
                   "ids": torch.tensor(self.ids, dtype=torch.int64)}
        save_file(tensors, str(path), metadata={"format": STATES_FORMAT, "encoder": encoder})

    @classmethod
    def load(cls, path: str | Path, *, ids: list[int] | None = None) -> ContextStates:
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("format") != STATES_FORMAT:
                    raise CepeRagError(f"{path} is not a cepe-rag context-states file")
                all_ids = handle.get_tensor("ids").tolist()
                lengths = handle.get_tensor("lengths").tolist()
                flat = handle.get_tensor("states")
        except (OSError, ValueError, RuntimeError) as error:
            raise CepeRagError(f"{path}: unreadable context states ({error})") from None
        states = list(torch.split(flat, lengths, dim=-2)) if lengths else []
        loaded = cls(all_ids, states)
        return cls(ids, loaded.select(ids)) if ids is not None else loaded
