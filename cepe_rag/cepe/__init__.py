"""The CEPE model: parallel chunk encoder + cross-attention on a frozen stock decoder."""

from cepe_rag.cepe.context import ContextStates, build_encoder, encode_chunks
from cepe_rag.cepe.model import CepeForCausalLM
from cepe_rag.cepe.modeling import CrossAttention, CrossContext

__all__ = ["CepeForCausalLM", "ContextStates", "CrossAttention", "CrossContext", "build_encoder", "encode_chunks"]
