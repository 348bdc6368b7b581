"""The CEPE adapter shipped for SmolLM2-135M-Instruct, end to end on the real models."""

import pytest
import torch

import cepe_rag.readers.generation as generation
from cepe_rag.cepe import load_cepe
from cepe_rag.readers import GenerationConfig, make_reader
from cepe_rag.settings import packaged_cepe
from cepe_rag.types import Passage

pytestmark = pytest.mark.real_models

# Invented facts (no decoder can know them) about two near-namesakes, and an unrelated passage.
PASSAGES = [
    Passage(1, "The Quorvath Bridge is a stone footbridge over the river Vellin. It was designed by the engineer "
               "Mirela Stanchev and opened in 1887.", title="Quorvath Bridge"),
    Passage(2, "The Varnholt Bridge is an iron road bridge over the river Oskel. It was designed by the architect "
               "Tomas Ekwall and opened in 1902.", title="Varnholt Bridge"),
    Passage(3, "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.", title="Eiffel Tower"),
]


def answer_log_likelihood(reader, question, passages, answer, monkeypatch) -> float:
    """log p(answer, then the end of the turn | question, passages): the answer's tokens forced through the reader's
    own decoding loop (encoder, cross-attention, cache), each scored by the decoder's log-softmax."""
    ids = reader.tokenizer(answer, add_special_tokens=False)["input_ids"] + [reader.tokenizer.eos_token_id]
    scores = []

    def forced(logits, config, generator):
        scores.append(torch.log_softmax(logits.float(), dim=-1)[0, ids[len(scores)]].item())
        return torch.tensor([ids[len(scores) - 1]], device=logits.device)

    with monkeypatch.context() as patch:
        patch.setattr(generation, "_next_tokens", forced)
        reader.answer(question, passages, max_new_tokens=len(ids))
    assert len(scores) == len(ids)
    return sum(scores)


@pytest.mark.parametrize("question, answer, other", [
    ("Who designed the Quorvath Bridge?", "Mirela Stanchev", "Tomas Ekwall"),
    ("Who designed the Varnholt Bridge?", "Tomas Ekwall", "Mirela Stanchev"),
])
def test_the_shipped_adapter_reads_the_relevant_passage_among_near_namesakes(question, answer, other, monkeypatch):
    """The packaged adapter (copy pointer, read as its card says: relevance prior, sentence prior, question-name
    penalty) reads an invented fact from the encoder: in its own distribution (free decoding), the right designer's
    name is far likelier with the passages than without (measured, float32: 32-44 nats) and than the near-namesake's
    designer, who is in the context too (measured: 42 and 77 nats; under session 8's T = 0.05, 5.1 and 10.9: at
    T = 0.01 the namesake's passage is all but weighed out).

    The card also asks for extractive decoding: the greedy answer is a span of a passage (exact by construction),
    and, asked "who", a name that ends where the passage stops naming and not before: the right name, no more (it
    used to run on: "Mirela Stanchev and opened in 1887"; under the span rules its first token leads the namesake's
    by 4.6 nats, measured, and the rest is forced)."""
    path = packaged_cepe()
    assert path is not None
    model = load_cepe(path)  # float32
    assert model.pointer is not None and model.config.num_cross_attn_layers == 8 and model.config.copy_line_starts
    reader = make_reader("cepe", model, model.decoder_tokenizer, generation=GenerationConfig(max_new_tokens=12))
    assert reader.relevance_temperature == model.reader_settings["relevance_temperature"] > 0  # the card's prior
    assert reader.extractive and model.reader_settings["extractive"]
    greedy = reader.answer(question, PASSAGES).text
    assert greedy and any(greedy in f"{p.title} {p.text}" for p in PASSAGES), greedy
    assert greedy == answer
    weights = torch.tensor(reader.prepare(question, PASSAGES).plan.log_weights).exp()
    gold = 0 if answer == "Mirela Stanchev" else 1
    assert int(weights.argmax()) == gold and float(weights[gold]) > 0.9
    # The likelihoods are the reader's own distribution: what it read, not what the span rules leave it (forced to go
    # on, "Tomas" has one continuation under them, so a constrained margin would only measure the first token).
    reader.extractive = False
    read = answer_log_likelihood(reader, question, PASSAGES, answer, monkeypatch)
    assert read > answer_log_likelihood(reader, question, [], answer, monkeypatch) + 20
    assert read > answer_log_likelihood(reader, question, PASSAGES, other, monkeypatch) + 10
