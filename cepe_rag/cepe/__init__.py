"""The CEPE model: parallel chunk encoder + cross-attention on a frozen stock decoder.

encoder.py (chunks -> states) -> cross_attention.py (the added block) -> model.py (the wrapped decoder)
-> checkpoints.py (loading and saving; imports the model, never the reverse).
"""

from cepe_rag.cepe.checkpoints import load_cepe
from cepe_rag.cepe.cross_attention import CrossAttention, CrossContext
from cepe_rag.cepe.encoder import ContextStates, build_encoder, encode_chunks
from cepe_rag.cepe.model import CepeForCausalLM, ChunkStateCache

__all__ = ["CepeForCausalLM", "ChunkStateCache", "ContextStates", "CrossAttention", "CrossContext", "build_encoder",
           "encode_chunks", "load_cepe"]
