"""CEPE passage states, one module: how a passage becomes encoder states (length-sorted batches, kept in float16),
the in-memory cache the reader and training share, the index-time encoder and the states an index stores, the stamp
that says which encoder made them, and the source protocol the reader reads through.

A passage's states depend on nothing but its text, the encoder and the chunking: they are computed once (at index
time, or the first time a question retrieves the passage) and reused. Every path rounds them to float16, as an index
stores them, so an answer does not depend on where its passages' states came from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cepe_rag.indexes import PassageStore
from cepe_rag.types import CepeRagError, Passage

if TYPE_CHECKING:
    from cepe_rag.cepe.model import CepeForCausalLM

STATES_DTYPE = torch.float16  # as an index stores them
STATES_FORMAT = "cepe-context-states"


class StateSource(Protocol):
    """Where the CEPE reader finds precomputed states: by passage id, for those it covers."""

    def states_for(self, passages: Sequence[Passage]) -> dict[int, torch.Tensor]: ...


def encode_texts(model, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Encoder states of each text (a passage's prompt text), in the order given, in STATES_DTYPE. Texts are encoded
    shortest first, `batch_size` at a time, so a batch holds little padding."""
    if not texts:
        return []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    encoded = model.encode_token_chunks(model.tokenize_chunks([texts[i] for i in order]), batch_size=batch_size)
    by_position = dict(zip(order, encoded))
    return [by_position[i].to(STATES_DTYPE) for i in range(len(texts))]


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


class ChunkStateCache:
    """Encoder states by chunk text: a chunk's states depend on its text alone, and the same passages come
    back in many questions (and training examples). Missing texts are encoded in length-sorted batches;
    beyond `max_chunks` the least recently used are dropped (None: keep all)."""

    def __init__(self, model: CepeForCausalLM, *, max_chunks: int | None = None,
                 batch_size: int = 64):
        self.model = model
        self.max_chunks = max_chunks
        self.batch_size = batch_size
        self.states: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.states)

    @torch.no_grad()
    def lookup(self, texts: Sequence[str]) -> list[torch.Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.states))
        self.states.update(zip(missing, encode_texts(self.model, missing, self.batch_size)))
        found = []
        for text in texts:
            self.states.move_to_end(text)
            found.append(self.states[text])
        while self.max_chunks is not None and len(self.states) > self.max_chunks:
            self.states.popitem(last=False)
        return found


class StateEncoder:
    """Index-time encoding with a CEPE model's encoder, exactly as the CEPE reader encodes a passage."""

    def __init__(self, model, batch_size: int = 64, state_format: str = "float16"):
        self.model = model
        self.batch_size = batch_size
        self.state_format = state_format  # how the store keeps them (CONTEXT_STATE_FORMATS)
        self.stamp = model.states_stamp()
        self.hidden_size = model.encoder.config.hidden_size

    @torch.inference_mode()
    def encode(self, passages: Sequence[Passage]) -> list[np.ndarray]:
        texts = [p.as_prompt_text() for p in passages]
        return [state.cpu().numpy() for state in encode_texts(self.model, texts, self.batch_size)]


class StoredStates:
    """The CEPE reader's state source over an index: the stored states of the passages asked for, when the
    stored passage reads as the one given (same chunk text: passages from elsewhere, or reordered by sentence focus,
    are encoded on the fly)."""

    def __init__(self, store: PassageStore, hidden_size: int):
        self.store = store
        self.hidden_size = hidden_size

    def states_for(self, passages: Sequence[Passage]) -> dict[int, torch.Tensor]:
        stored = self.store.context_states([p.id for p in passages], self.hidden_size)
        if not stored:
            return {}
        originals = self.store.passages(list(stored))
        return {p.id: torch.from_numpy(stored[p.id].copy()) for p in passages
                if p.id in stored and originals[p.id].as_prompt_text() == p.as_prompt_text()}


def use_stored_states(reader, store: PassageStore) -> str | None:
    """Let a CEPE reader read the index's stored states when they were made by its encoder. Returns what to tell
    the user when it cannot (None when it can, or when the reader is not a CEPE reader)."""
    model = getattr(reader, "model", None)
    if not hasattr(reader, "context_states") or not hasattr(model, "states_stamp"):
        return None
    stamp = store.context_states_stamp()
    if stamp is None or store.context_states_count() == 0:
        return ("this index stores no context states: encoding the passages on the fly (`cepe-rag index "
                "--context-states` stores them)")
    if stamp != model.states_stamp():
        return ("this index's context states were made by another encoder or chunking: encoding the passages on "
                "the fly (re-run `cepe-rag index --context-states` with this --cepe-model to replace them)")
    reader.context_states = StoredStates(store, model.encoder.config.hidden_size)
    return None
