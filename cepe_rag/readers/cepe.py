"""The CEPE reader: top passages optionally in the prompt, the rest encoded in parallel and cross-attended."""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from cepe_rag.cepe import CepeForCausalLM, ChunkStateCache, StateSource
from cepe_rag.documents.sentences import sentences as passage_sentences
from cepe_rag.documents.sentences import without_title
from cepe_rag.models import embed_texts, load_embedder
from cepe_rag.readers.base import NO_CONVERSATION, PreparedPrompt, Reader, passage_block, question_text
from cepe_rag.readers.generation import DecodeBatch, GenerationConfig
from cepe_rag.readers.question_names import (
    asked_names,
    missing_name_share,
    named_tokens,
    question_names,
    question_words,
)
from cepe_rag.settings import CROSS_KV_BUDGET_MB
from cepe_rag.types import Conversation, Passage, passage_embedding_text


@dataclass
class CepePlan:
    """What a prepared request encodes: its encoder passages and, with a relevance prior, each one's log weight; with a
    sentence prior, each of their tokens' log weight within its passage."""

    passages: list[Passage]
    log_weights: list[float] | None = field(default=None)
    token_log_weights: list[list[float]] | None = field(default=None)
    copy_log_weights: list[list[float]] | None = field(default=None)  # the copy pointer's own, per token

    def chunk_log_weights(self) -> list[float | list[float]]:
        """Per passage: its weight, or (with a sentence prior) its weight plus each token's."""
        return combined_log_weights(self.log_weights or [0.0] * len(self.passages), self.token_log_weights)


def combined_log_weights(chunk_weights: Sequence[float], token_weights: Sequence[Sequence[float]] | None
                         ) -> list[float | list[float]]:
    """Each chunk's weight, plus each of its tokens' where there are token weights (CrossContext's prior layout)."""
    if token_weights is None:
        return list(chunk_weights)
    return [[chunk + token for token in tokens] for chunk, tokens in zip(chunk_weights, token_weights)]


@lru_cache(maxsize=1)
def _default_embedder():
    return load_embedder()


def relevance_log_weights(question: str, passages: Sequence[Passage], temperature: float,
                          prior: RelevancePrior) -> list[float]:
    """log softmax(cosine(question, passage) / temperature) over the passages under the retrieval embedder: the
    retriever's own cosine (`dense_score`) when every passage has one, else embedded here as the index embeds them."""
    if all(p.dense_score is not None for p in passages):
        scores = [p.dense_score for p in passages]
    else:
        scores = prior.cosines(question, [passage_embedding_text(p.title, p.text) for p in passages])
    return torch.log_softmax(torch.tensor(scores, dtype=torch.float64) / temperature, dim=0).tolist()


def sentence_log_weights(question: str, passage: Passage, chunk_text: str, offsets: Sequence[tuple[int, int]],
                         temperature: float, prior: RelevancePrior) -> list[float]:
    """Per token of a passage's chunk (`offsets` in `chunk_text`): (cosine(question, its sentence) - the best
    sentence's) / temperature, so the sentence most like the question keeps its passage's weight and each other one is
    scaled down. Sentences are scored as sentence focus scores them (the title's words taken out of both sides, or the
    sentence naming the subject wins); the "Document (Title: ...):" head counts as the best sentence."""
    body = passage.focused_text if passage.focused_text is not None else passage.text
    parts = passage_sentences(body)
    if len(parts) < 2:
        return [0.0] * len(offsets)
    starts, cursor = [], chunk_text.rfind(body)
    if cursor < 0:  # not laid out as expected: no sentence prior rather than a wrong one
        return [0.0] * len(offsets)
    for part in parts:
        cursor = chunk_text.find(part, cursor)
        if cursor < 0:
            return [0.0] * len(offsets)
        starts.append(cursor)
        cursor += len(part)
    cosines = prior.cosines(without_title(question, passage.title),
                            [without_title(part, passage.title) for part in parts])
    best = max(cosines)
    weights = [(cosine - best) / temperature for cosine in cosines]
    return [0.0 if start < starts[0] else weights[bisect.bisect_right(starts, start) - 1] for start, _ in offsets]


# A passage weighted below e^-15 (3e-7) can add nothing to what the reader reads: it gets no sentence weights, and an
# extractive answer is not a span of it.
PRIOR_FLOOR = -15.0

_CHUNK_HEAD = re.compile(r"Document(?: \(Title: (.*?)\))?: ", re.DOTALL)


def passage_of_chunk(text: str) -> Passage:
    """The passage a chunk's text was written from (the inverse of `Passage.as_prompt_text`)."""
    head = _CHUNK_HEAD.match(text)
    return Passage(0, text[head.end():], title=head.group(1) or "") if head else Passage(0, text)


def reading_log_weights(question: str, passages: Sequence[Passage], chunk_texts: Sequence[str],
                        offsets: Sequence[Sequence[tuple[int, int]]], prior: RelevancePrior, *,
                        relevance_temperature: float, sentence_temperature: float, name_match_penalty: float = 0.0,
                        chunk_weights: Sequence[float] | None = None) -> tuple[list[float] | None, list | None]:
    """(each passage's log weight, or None without a relevance prior; each of its tokens' log weight within it, or
    None without a sentence prior): what the reader adds to the cross-attention and pointer scores, and what training
    under the same priors adds. `chunk_weights` given: the passages' weights as already computed."""
    log_weights = list(chunk_weights) if chunk_weights is not None else None
    if log_weights is None and relevance_temperature > 0 and len(passages) > 1:
        log_weights = relevance_log_weights(question, passages, relevance_temperature, prior)
        names = asked_names(question, [p.title for p in passages], [p.text for p in passages]) \
            if name_match_penalty > 0 else set()
        if names:
            shifted = [weight - name_match_penalty * missing_name_share(names, f"{p.title} {p.text}")
                       for weight, p in zip(log_weights, passages)]
            log_weights = torch.log_softmax(torch.tensor(shifted, dtype=torch.float64), dim=0).tolist()
    token_log_weights = None
    if sentence_temperature > 0 and passages:
        weights = log_weights or [0.0] * len(passages)
        token_log_weights = [
            sentence_log_weights(question, passage, text, spans, sentence_temperature, prior)
            if weight > PRIOR_FLOOR else [0.0] * len(spans)
            for passage, text, spans, weight in zip(passages, chunk_texts, offsets, weights)]
    return log_weights, token_log_weights


def question_name_log_weights(question: str, chunk_text: str, offsets: Sequence[tuple[int, int]],
                              penalty: float) -> list[float]:
    """Per token of a chunk: -penalty on the words of the names the question mentions (and on an article just before
    one), 0 elsewhere (question_names.py)."""
    if penalty <= 0:
        return [0.0] * len(offsets)
    return [-penalty if named else 0.0 for named in named_tokens(question, chunk_text, offsets)]


class RelevancePrior:
    """log softmax(cosine(question, chunk) / temperature) over an example's chunks, as the cepe reader weights its
    passages; embeddings are kept by text (the same passages come back again and again), up to `max_texts`."""

    def __init__(self, temperature: float, embedder=None, max_texts: int = 50_000):
        self.temperature = temperature
        self.embedder = embedder
        self.max_texts = max_texts
        self.vectors: dict[str, np.ndarray] = {}

    def cosines(self, question: str, texts: Sequence[str]) -> list[float]:
        missing = [text for text in dict.fromkeys([question, *texts]) if text not in self.vectors]
        if missing:
            if self.embedder is None:
                self.embedder = _default_embedder()
            if len(self.vectors) + len(missing) > self.max_texts:
                self.vectors.clear()
            self.vectors.update(zip(missing, np.asarray(embed_texts(self.embedder, missing), dtype=np.float64)))
        query = self.vectors[question]
        return [float(self.vectors[text] @ query) for text in texts]

    def __call__(self, question: str, chunks: Sequence[str]) -> list[float]:
        scores = torch.tensor(self.cosines(question, chunks), dtype=torch.float64)
        return torch.log_softmax(scores / self.temperature, dim=0).tolist()


class CepeReader(Reader):
    """The paper's split: the top `n_prompt_passages` in the prompt, the next `n_encoder_passages` (all
    the rest if None) through the encoder, one passage per chunk. `context_states` (precomputed: a
    ContextStates set, or an index's stored states) skip the encoder for the passages they cover.

    `relevance_temperature` T > 0 adds a relevance prior (None: the checkpoint's own setting, its card's
    `"reader": {"relevance_temperature": T}`, else none): each encoded passage's share of every cross-attention (and
    copy-pointer) softmax is multiplied by softmax(cosine(question, passage) / T) over the encoded passages, scored by
    the retrieval embedder: the retriever's own cosine when the passages carry it, else embedded by `embedder` (default:
    the packaged MiniLM). With one encoded passage it changes nothing. `sentence_temperature` S > 0 (None: the card's
    `"sentence_temperature"`, else none) adds a sentence prior inside each encoded passage (`sentence_log_weights`):
    the relevance prior picks the passage, this one the sentence that answers the question. `name_match_penalty` P > 0
    (None: the card's) lowers each encoded passage's relevance weight by P times the share of the question's names it
    lacks (it acts only with a relevance prior and more than one encoded passage). With extractive decoding an answer
    is a span of a passage in the prompt or of an encoded one the relevance prior weighs above e^PRIOR_FLOOR.

    States computed here are rounded to float16, as stored states are, so that an answer does not depend on
    where its passages' states came from."""

    name = "cepe"

    def __init__(self, model: CepeForCausalLM, tokenizer, *, n_prompt_passages: int = 0,
                 n_encoder_passages: int | None = None, context_states: StateSource | None = None,
                 cross_kv_budget_mb: float = CROSS_KV_BUDGET_MB, max_cached_passages: int = 20_000,
                 relevance_temperature: float | None = None, sentence_temperature: float | None = None,
                 question_name_penalty: float | None = None, name_match_penalty: float | None = None,
                 extractive: bool | None = None, embedder=None, **kwargs):
        settings = getattr(model, "reader_settings", {})
        super().__init__(model, tokenizer, extractive=settings.get("extractive", False) if extractive is None
                         else extractive, **kwargs)
        self.relevance_temperature = settings.get("relevance_temperature", 0.0) if relevance_temperature is None \
            else relevance_temperature
        self.sentence_temperature = settings.get("sentence_temperature", 0.0) if sentence_temperature is None \
            else sentence_temperature
        self.question_name_penalty = settings.get("question_name_penalty", 0.0) if question_name_penalty is None \
            else question_name_penalty
        self.name_match_penalty = settings.get("name_match_penalty", 0.0) if name_match_penalty is None \
            else name_match_penalty
        self._embedder = embedder
        self._prior: RelevancePrior | None = None
        self.n_prompt_passages = n_prompt_passages
        self.n_encoder_passages = n_encoder_passages
        self.context_states = context_states
        self.cross_kv_budget_mb = cross_kv_budget_mb
        # Many questions retrieve the same passages (and top-5 is in top-20); keyed by text: ids are not unique.
        self.encoded = ChunkStateCache(model, max_chunks=max_cached_passages)

    def split(self, passages: Sequence[Passage]) -> tuple[list[Passage], list[Passage]]:
        in_prompt = list(passages[: self.n_prompt_passages])
        rest = passages[self.n_prompt_passages:]
        return in_prompt, list(rest if self.n_encoder_passages is None else rest[: self.n_encoder_passages])

    @property
    def prior(self) -> RelevancePrior:
        """Embeds passages only when they come without the retriever's cosine (the packaged MiniLM by default)."""
        if self._prior is None:
            self._prior = RelevancePrior(self.relevance_temperature, self._embedder)
        return self._prior

    def prepare(self, question: str, passages: Sequence[Passage],
                conversation: Conversation = NO_CONVERSATION) -> PreparedPrompt[CepePlan]:
        """The plan: the passages read through the encoder (the others are in the prompt), and their prior."""
        in_prompt, in_encoder = self.split(passages)
        documents = "".join(passage_block(p.as_prompt_text()) for p in in_prompt)
        ids = self.chat_ids(self.ahead_of_passages(question, in_prompt) + documents + question_text(question),
                            conversation)
        self.check_fits(len(ids))
        texts = [p.as_prompt_text() for p in in_encoder]
        penalty = self.question_name_penalty if self.model.pointer is not None else 0.0
        offsets = self.model.chunk_token_offsets(texts) if self.sentence_temperature > 0 or penalty > 0 else []
        log_weights, token_log_weights = reading_log_weights(
            question, in_encoder, texts, offsets, self.prior, relevance_temperature=self.relevance_temperature,
            sentence_temperature=self.sentence_temperature, name_match_penalty=self.name_match_penalty)
        copy_log_weights = None
        if penalty > 0 and (question_names(question) or question_words(question)):
            copy_log_weights = [question_name_log_weights(question, text, spans, penalty)
                                for text, spans in zip(texts, offsets)]
        return PreparedPrompt(ids, in_prompt + in_encoder, plan=CepePlan(in_encoder, log_weights, token_log_weights,
                                                                           copy_log_weights))

    def answerable_passages(self, request: PreparedPrompt[CepePlan]) -> list[Passage]:
        """Those in the prompt, and the encoded ones the relevance prior gives a weight above e^PRIOR_FLOOR: a span
        of a passage the prior has all but removed from every softmax is an answer the reader did not read (a
        bridge's designer copied from another bridge's passage 0.3 below it in cosine)."""
        plan = request.plan
        if plan is None or plan.log_weights is None:
            return request.passages
        in_prompt = request.passages[: len(request.passages) - len(plan.passages)]
        return in_prompt + [p for p, weight in zip(plan.passages, plan.log_weights) if weight > PRIOR_FLOOR]

    def _chunk_states(self, passages: list[Passage]) -> list[torch.Tensor]:
        """Stored states where the index has them; the others through the (caching) encoder."""
        stored = self.context_states.states_for(passages) if self.context_states else {}
        texts = [p.as_prompt_text() for p in passages]
        unstored = list(dict.fromkeys(text for p, text in zip(passages, texts) if p.id not in stored))
        encoded = dict(zip(unstored, self.encoded.lookup(unstored)))
        return [stored[p.id] if p.id in stored else encoded[text] for p, text in zip(passages, texts)]

    def cross_kv_mode(self, states_per_request: list[list[torch.Tensor]]) -> str:
        """Cache the cross-attention K/V of the requests started together for their whole answers when they fit the
        budget (one projection, the fastest decoding); beyond it, attend to the encoder states through the
        projections ("absorb"): no K/V at all, 1/8 of the memory with 8 layers, decoding about as fast. Equal outputs,
        to rounding. (Requests joining a running batch bring their own K/V; each start is budgeted on its own.)"""
        layers = self.model.cross_attention_layers()
        projection = layers[0].cross_attn.k_proj
        longest = max((sum(s.shape[-2] for s in request) for request in states_per_request), default=0)
        padded_tokens = len(states_per_request) * longest  # K/V are allocated padded to the longest request
        needed = padded_tokens * len(layers) * 2 * projection.out_features * projection.weight.element_size()
        return "cache" if needed <= self.cross_kv_budget_mb * 2**20 else "absorb"

    def start(self, prepared: list[PreparedPrompt], config: GenerationConfig,
              limits: list[int] | None = None) -> DecodeBatch:
        with torch.inference_mode():
            states = [self._chunk_states(p.plan.passages) for p in prepared]
            token_ids = None
            if self.model.pointer is not None:  # a copy pointer reads the passages' tokens too
                token_ids = [self.model.tokenize_chunks([passage.as_prompt_text() for passage in p.plan.passages])
                             for p in prepared]
            log_weights = None
            if any(p.plan.log_weights is not None or p.plan.token_log_weights is not None for p in prepared):
                log_weights = [p.plan.chunk_log_weights() for p in prepared]  # a request without a prior: weights of 1
            copy_log_weights = None
            if any(p.plan.copy_log_weights is not None for p in prepared):
                copy_log_weights = [p.plan.copy_log_weights or [0.0] * len(p.plan.passages) for p in prepared]
            context = self.model.context_from_states(states, cross_kv=self.cross_kv_mode(states), token_ids=token_ids,
                                                     chunk_log_weights=log_weights, copy_log_weights=copy_log_weights)
        return DecodeBatch(self.model, [p.ids for p in prepared], self.tokenizer, config, device=self.model.device,
                           limits=limits, constraints=self.span_constraints(prepared), cross_context=context)
