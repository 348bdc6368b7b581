"""The CEPE model: parallel chunk encoder + cross-attention on a frozen stock decoder.

encoder.py (chunks -> states) -> cross_attention.py (the added block) -> model.py (the wrapped decoder)
-> checkpoints.py (loading and saving; imports the model, never the reverse); states.py owns passage states: encoding,
the cache, the index-time encoder, stored states and the stamp check.
"""

from cepe_rag.cepe.checkpoints import load_cepe, load_state_encoder
from cepe_rag.cepe.cross_attention import CrossAttention, CrossContext
from cepe_rag.cepe.encoder import build_encoder, encode_chunks
from cepe_rag.cepe.model import CepeForCausalLM
from cepe_rag.cepe.states import (
    STATES_DTYPE,
    ChunkStateCache,
    ContextStates,
    StateEncoder,
    StateSource,
    StoredStates,
    use_stored_states,
)

__all__ = ["STATES_DTYPE", "CepeForCausalLM", "ChunkStateCache", "ContextStates", "CrossAttention", "CrossContext",
           "StateEncoder", "StateSource", "StoredStates", "build_encoder", "encode_chunks", "load_cepe",
           "load_state_encoder", "use_stored_states"]
