"""CEPE context states stored in an index: written at index time, read per request by the CEPE reader.

A passage's encoder states depend on nothing but its text, the encoder and the chunking, so they are
computed once, when the passage is indexed, and stored (float16) beside it in SQLite, in the same
transaction. Asking reads only the retrieved passages' states from disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cepe_rag.indexes import IndexStore
from cepe_rag.types import Passage


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
        order = sorted(range(len(passages)), key=lambda i: len(passages[i].text))  # less padding per batch
        texts = [passages[i].as_prompt_text() for i in order]
        states = self.model.encode_token_chunks(self.model.tokenize_chunks(texts), batch_size=self.batch_size)
        by_position = dict(zip(order, states))
        return [by_position[i].to(torch.float16).cpu().numpy() for i in range(len(passages))]


def load_state_encoder(checkpoint: str, device: str | None = None, state_format: str = "float16") -> StateEncoder:
    """A CEPE checkpoint's `StateEncoder` (on `device`, by default the GPU if there is one): `cepe-rag index
    --context-states` makes one here and, with `--engine ray`, one in every worker."""
    from cepe_rag.cepe import load_cepe  # transformers: only index runs that store states pay for it
    from cepe_rag.models import default_device

    return StateEncoder(load_cepe(checkpoint, device=device or default_device()), state_format=state_format)


class StoredStates:
    """The CEPE reader's state source over an index: the stored states of the passages asked for, when the
    stored passage is the one given (same text and title: passages from elsewhere are encoded on the fly)."""

    def __init__(self, store: IndexStore, hidden_size: int):
        self.store = store
        self.hidden_size = hidden_size

    def states_for(self, passages: Sequence[Passage]) -> dict[int, torch.Tensor]:
        stored = self.store.context_states([p.id for p in passages], self.hidden_size)
        if not stored:
            return {}
        originals = self.store.passages(list(stored))
        return {p.id: torch.from_numpy(stored[p.id].copy()) for p in passages
                if p.id in stored and (originals[p.id].text, originals[p.id].title) == (p.text, p.title)}


def use_stored_states(reader, store: IndexStore) -> str | None:
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
