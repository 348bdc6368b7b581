"""The CEPE adapter shipped for SmolLM2-135M-Instruct, end to end on the real models."""

import pytest
import torch

import cepe_rag.readers.generation as generation
from cepe_rag.cepe import load_cepe
from cepe_rag.readers import GenerationConfig, make_reader
from cepe_rag.settings import packaged_cepe
from cepe_rag.types import Passage

pytestmark = pytest.mark.real_models

PASSAGES = [
    Passage(1, "2001: A Space Odyssey is a 1968 epic science fiction film produced and directed by Stanley Kubrick.",
            title="2001: A Space Odyssey"),
    Passage(2, "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.", title="Eiffel Tower"),
    Passage(3, "The Nile is a major north-flowing river in northeastern Africa.", title="Nile"),
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


def test_the_shipped_adapter_answers_from_its_encoder_in_the_trained_format(monkeypatch):
    """Cross-attention to the encoded passages changes what the decoder says, as the adapter was trained to: a short
    span instead of a sentence, and the year 5.5 nats likelier (float32: log p("1889", end) -1.48 with the passages,
    -7.03 without).

    Not asserted: which year it greedily picks. "1889" beats "1888" by 0.2 nats only, and the frozen decoder knows
    the year itself (forced to "completed in", it goes on "1889"); with a counterfactual year in the passage it
    still answers "1889" (log p of the passage's year moves by 0.02 nats): this adapter's answers hardly depend on
    what it reads (docs/training.md, "Results of the shipped adapter": answer loss 2.51 with its own passages, 2.59 with
    another question's). `python benchmarks/answer_margins.py` measures the greedy margins."""
    path = packaged_cepe()
    assert path is not None
    model = load_cepe(path)  # float32
    assert model.config.num_cross_attn_layers == 8 and model.training_history[-1]["stage"] == "read"
    reader = make_reader("cepe", model, model.decoder_tokenizer, generation=GenerationConfig(max_new_tokens=12))
    question = "When was the Eiffel Tower completed?"
    read = reader.answer(question, PASSAGES)
    assert read.usage["passages_read"] == 3 and read.text.isdigit()  # every runner-up within 2 nats: digits too
    assert len(reader.answer(question, []).text.split()) > 3  # the frozen decoder alone: a sentence
    with_passages = answer_log_likelihood(reader, question, PASSAGES, "1889", monkeypatch)
    alone = answer_log_likelihood(reader, question, [], "1889", monkeypatch)
    assert with_passages > alone + 3
