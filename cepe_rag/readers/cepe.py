"""The CEPE reader: top passages optionally in the prompt, the rest encoded in parallel and cross-attended."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cepe_rag.cepe import CepeForCausalLM, ChunkStateCache, ContextStates
from cepe_rag.readers.base import PreparedPrompt, Reader, passage_block, question_text
from cepe_rag.readers.generation import GenerationConfig, generate
from cepe_rag.types import Passage


class CepeReader(Reader):
    """The paper's split: the top `n_prompt_passages` in the prompt, the next `n_encoder_passages` (all
    the rest if None) through the encoder, one passage per chunk. `context_states` (precomputed at index
    time, keyed by passage id) skip the encoder for the passages they cover."""

    name = "cepe"

    def __init__(self, model: CepeForCausalLM, tokenizer, *, n_prompt_passages: int = 0,
                 n_encoder_passages: int | None = None, context_states: ContextStates | None = None,
                 cache_cross_kv: bool = True, max_cached_passages: int = 20_000, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.n_prompt_passages = n_prompt_passages
        self.n_encoder_passages = n_encoder_passages
        self.context_states = context_states
        self.cache_cross_kv = cache_cross_kv
        # Many questions retrieve the same passages (and top-5 is in top-20); keyed by text: ids are not unique.
        self.encoded = ChunkStateCache(model, max_chunks=max_cached_passages)

    def split(self, passages: Sequence[Passage]) -> tuple[list[Passage], list[Passage]]:
        in_prompt = list(passages[: self.n_prompt_passages])
        rest = passages[self.n_prompt_passages:]
        return in_prompt, list(rest if self.n_encoder_passages is None else rest[: self.n_encoder_passages])

    def prepare(self, question: str, passages: Sequence[Passage]) -> PreparedPrompt:
        in_prompt, in_encoder = self.split(passages)
        documents = "".join(passage_block(p.as_prompt_text()) for p in in_prompt)
        ids = self.chat_ids(self.ahead_of_passages(question, in_prompt) + documents + question_text(question))
        self.check_fits(len(ids))
        return PreparedPrompt(ids, in_prompt + in_encoder, plan=in_encoder)

    def _chunk_states(self, passages: list[Passage]) -> list[torch.Tensor]:
        """Stored states where the index has them; the others through the (caching) encoder."""
        stored = dict(zip(self.context_states.ids, self.context_states.states)) if self.context_states else {}
        texts = [p.as_prompt_text() for p in passages]
        unstored = list(dict.fromkeys(text for p, text in zip(passages, texts) if p.id not in stored))
        encoded = dict(zip(unstored, self.encoded.lookup(unstored)))
        return [stored[p.id] if p.id in stored else encoded[text] for p, text in zip(passages, texts)]

    def stream_prepared(self, prepared: list[PreparedPrompt], config: GenerationConfig) -> Iterator[list[str]]:
        with torch.inference_mode():
            states = [self._chunk_states(p.plan) for p in prepared]
            context = self.model.context_from_states(states, cache_kv=self.cache_cross_kv)
        yield from generate(self.model, [p.ids for p in prepared], self.tokenizer, config, device=self.model.device,
                            cross_context=context)
