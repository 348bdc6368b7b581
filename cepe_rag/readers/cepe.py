"""The CEPE reader: top passages optionally in the prompt, the rest encoded in parallel and cross-attended."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from cepe_rag.cepe import CepeForCausalLM, ContextStates
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
        # States depend on the passage alone: many questions retrieve the same passages (and top-5 is in top-20).
        self.max_cached_passages = max_cached_passages
        self._encoded: OrderedDict[str, torch.Tensor] = OrderedDict()  # keyed by text: ids are not unique

    def split(self, passages: Sequence[Passage]) -> tuple[list[Passage], list[Passage]]:
        in_prompt = list(passages[: self.n_prompt_passages])
        rest = passages[self.n_prompt_passages:]
        return in_prompt, list(rest if self.n_encoder_passages is None else rest[: self.n_encoder_passages])

    def prepare(self, question: str, passages: Sequence[Passage]) -> PreparedPrompt:
        in_prompt, in_encoder = self.split(passages)
        documents = "".join(passage_block(p.as_prompt_text()) for p in in_prompt)
        ids = self.chat_ids(documents + question_text(question))
        self.check_fits(len(ids))
        return PreparedPrompt(ids, in_prompt + in_encoder, plan=in_encoder)

    def _chunk_states(self, passages: list[Passage]) -> list[torch.Tensor]:
        """Stored states where the index has them, then recently encoded ones; the encoder, in one batch, for the
        rest."""
        stored = dict(zip(self.context_states.ids, self.context_states.states)) if self.context_states else {}
        texts = [p.as_prompt_text() for p in passages]
        states = {text: stored[p.id] for p, text in zip(passages, texts) if p.id in stored}
        for text in texts:
            if text not in states and text in self._encoded:
                self._encoded.move_to_end(text)
                states[text] = self._encoded[text]
        missing = list(dict.fromkeys(t for t in texts if t not in states))
        if missing:
            fresh = self.model.encode_token_chunks(self.model.tokenize_chunks(missing))
            states.update(zip(missing, fresh))
            if self.max_cached_passages:
                self._encoded.update(zip(missing, fresh))
                while len(self._encoded) > self.max_cached_passages:
                    self._encoded.popitem(last=False)
        return [states[t] for t in texts]

    def _stream_prepared(self, prepared: list[PreparedPrompt], config: GenerationConfig) -> Iterator[list[str]]:
        with torch.inference_mode():
            states = [self._chunk_states(p.plan) for p in prepared]
            context = self.model.context_from_states(states, cache_kv=self.cache_cross_kv)
        yield from generate(self.model, [p.ids for p in prepared], self.tokenizer, config, device=self.model.device,
                            cross_context=context)
