import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_chat_llama(tokenizer, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama over the default decoder's real tokenizer (so chat templates apply)."""
    torch.manual_seed(0)
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()
