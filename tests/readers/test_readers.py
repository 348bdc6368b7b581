from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

from cepe_rag.padding import pad_token_ids
from cepe_rag.readers import ClosedBookReader, ConcatReader, GenerationConfig, Reader
from cepe_rag.readers.generation import _stop_index
from cepe_rag.types import CepeRagError, Passage
from tests.readers.conftest import tiny_chat_llama


@pytest.fixture(scope="module")
def tiny_chat_model(chat_tokenizer):
    return tiny_chat_llama(chat_tokenizer)


PASSAGES = [Passage(i, f"Passage number {i} says something about topic {i}.", f"Title {i}") for i in range(40)]


def test_concat_keeps_most_relevant_passages_that_fit_the_window(tiny_chat_model, chat_tokenizer):
    reader = ConcatReader(tiny_chat_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=16))
    prepared = reader.prepare("What is topic 3?", PASSAGES)
    assert 0 < len(prepared.passages) < len(PASSAGES)
    assert [p.id for p in prepared.passages] == list(range(len(prepared.passages)))
    assert len(prepared.ids) <= 512 - 16
    text = chat_tokenizer.decode(prepared.ids)
    assert "Document (Title: Title 0): Passage number 0" in text and text.rstrip().endswith("assistant")


def test_concat_can_put_the_most_relevant_passage_next_to_the_question(tiny_chat_model, chat_tokenizer):
    generation = GenerationConfig(max_new_tokens=16)
    first = ConcatReader(tiny_chat_model, chat_tokenizer, generation=generation).prepare("q?", PASSAGES)
    last = ConcatReader(tiny_chat_model, chat_tokenizer, generation=generation, most_relevant="last").prepare(
        "q?", PASSAGES)
    assert [p.id for p in last.passages] == [p.id for p in first.passages][::-1]  # the same passages fit
    text = chat_tokenizer.decode(last.ids)
    assert text.index("Passage number 0 ") > text.index("Passage number 1 ") > text.index("Passage number 2 ")
    assert sorted(last.ids) == sorted(first.ids)
    with pytest.raises(CepeRagError, match="most_relevant"):
        ConcatReader(tiny_chat_model, chat_tokenizer, most_relevant="middle")


def test_fewshot_prompt_shows_worked_examples_before_the_question(tiny_chat_model, chat_tokenizer):
    plain = ConcatReader(tiny_chat_model, chat_tokenizer).prepare("What is topic 3?", PASSAGES[:2])
    shots = ConcatReader(tiny_chat_model, chat_tokenizer, prompt_style="fewshot").prepare("What is topic 3?",
                                                                                          PASSAGES[:2])
    text = chat_tokenizer.decode(shots.ids)
    assert "Tobias Wrenfield" in text and text.index("Tobias Wrenfield") < text.index("Passage number 0")
    assert "Tobias Wrenfield" not in chat_tokenizer.decode(plain.ids)
    closed = ClosedBookReader(tiny_chat_model, chat_tokenizer, prompt_style="fewshot").prepare("q?", [])
    assert "Tessel Island" not in chat_tokenizer.decode(closed.ids)  # no documents in its examples
    assert "Who built Harrowmere Lighthouse?" in chat_tokenizer.decode(closed.ids)
    with pytest.raises(CepeRagError, match="prompt style"):
        ConcatReader(tiny_chat_model, chat_tokenizer, prompt_style="poem")


def test_query_aware_prompt_asks_before_and_after_the_passages(tiny_chat_model, chat_tokenizer):
    reader = ConcatReader(tiny_chat_model, chat_tokenizer, prompt_style="query-aware")
    text = chat_tokenizer.decode(reader.prepare("What is topic 3?", PASSAGES[:2]).ids)
    first, last = text.index("Question: What is topic 3?"), text.rindex("Question: What is topic 3?")
    assert first < text.index("Passage number 0") < text.index("Passage number 1") < last
    plain = chat_tokenizer.decode(ConcatReader(tiny_chat_model, chat_tokenizer, prompt_style="instruction").prepare(
        "What is topic 3?", PASSAGES[:2]).ids)
    assert plain.count("What is topic 3?") == 1 and plain == text.replace("Question: What is topic 3?\n\n", "", 1)
    alone = chat_tokenizer.decode(reader.prepare("What is topic 3?", []).ids)
    assert alone.count("What is topic 3?") == 1  # nothing to read: asked once


def test_streamed_deltas_add_up_to_the_answer_and_batch_equals_single(tiny_chat_model, chat_tokenizer):
    reader = ConcatReader(tiny_chat_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=10))
    questions = ["first question?", "a second, longer question about something?"]
    passages = [PASSAGES[:2], PASSAGES[5:8]]
    streamed = []
    batch = reader.answer_batch(questions, passages, on_token=streamed.append)
    assert "".join(streamed).strip() == batch[0].text
    for question, ps, answer in zip(questions, passages, batch):
        assert reader.answer(question, ps).text == answer.text
    assert batch[0].usage["passages_read"] == 2 and batch[0].reader == "concat"


def test_sampling_is_seeded_and_greedy_is_deterministic(tiny_chat_model, chat_tokenizer):
    reader = ClosedBookReader(tiny_chat_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=8))
    greedy = reader.answer("q?", []).text
    assert reader.answer("q?", []).text == greedy
    sampled = [reader.answer("q?", [], temperature=1.5, seed=s).text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]


def test_question_longer_than_window_is_refused(tiny_chat_model, chat_tokenizer):
    reader = ClosedBookReader(tiny_chat_model, chat_tokenizer)
    with pytest.raises(CepeRagError, match="prompt tokens"):
        reader.answer("why " * 600, [])


def test_stop_strings_and_left_padding():
    assert _stop_index("Paris\nand more", ("\n",), 0) == 5
    assert _stop_index("no stop here", ("\n", "###"), 0) is None
    ids, mask = pad_token_ids([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_token_ids([[1, 2, 3], [4], []], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]


def tiny_cepe_reader(model, tokenizer, init_mode, **kwargs):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cepe_rag.cepe import CepeForCausalLM
    from cepe_rag.models import embedder_path
    from cepe_rag.readers import CepeReader

    torch.manual_seed(3)
    encoder = BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    decoder = LlamaForCausalLM(model.config)
    decoder.load_state_dict(model.state_dict())
    cepe = CepeForCausalLM(decoder, encoder.eval(), init_mode=init_mode,
                           encoder_tokenizer=AutoTokenizer.from_pretrained(embedder_path())).eval()
    return CepeReader(cepe, tokenizer, generation=GenerationConfig(max_new_tokens=8), **kwargs)


def test_zero_initialised_cepe_reader_answers_like_the_plain_decoder(tiny_chat_model, chat_tokenizer):
    cepe = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "zero")
    plain = ConcatReader(tiny_chat_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=8))
    answer = cepe.answer("What is topic 3?", PASSAGES[:5])
    assert answer.text == plain.answer("What is topic 3?", []).text
    assert answer.usage["passages_read"] == 5 and answer.reader == "cepe"


def test_cepe_reader_splits_passages_and_reuses_precomputed_states(tiny_chat_model, chat_tokenizer):
    reader = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy", n_prompt_passages=2, n_encoder_passages=3)
    in_prompt, in_encoder = reader.split(PASSAGES[:10])
    assert [p.id for p in in_prompt] == [0, 1] and [p.id for p in in_encoder] == [2, 3, 4]
    prompt = chat_tokenizer.decode(reader.prepare("q?", PASSAGES[:10]).ids)
    assert "Passage number 1" in prompt and "Passage number 2" not in prompt
    fresh = reader.answer("What is topic 3?", PASSAGES[:10]).text
    reader.context_states = reader.model.encode_context([p.as_prompt_text() for p in PASSAGES[2:5]], ids=[2, 3, 4])
    assert reader.answer("What is topic 3?", PASSAGES[:10]).text == fresh


def test_cepe_reader_encodes_each_passage_text_once(tiny_chat_model, chat_tokenizer, monkeypatch):
    reader = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy")
    first = reader.answer("What is topic 3?", PASSAGES[:4]).text
    encoded = []
    original = reader.model.encode_token_chunks
    monkeypatch.setattr(reader.model, "encode_token_chunks", lambda ids, **kw: encoded.extend(ids) or original(ids))
    assert reader.answer("What is topic 3?", PASSAGES[:4]).text == first and encoded == []
    reader.answer("What is topic 3?", PASSAGES[2:6])
    assert len(encoded) == 2  # only the two new passages
    same_id = replace(PASSAGES[0], text="An unrelated passage about something else.")
    reader.answer("What is topic 3?", [same_id])
    assert len(encoded) == 3  # a different text under a known id is encoded, not confused with the cached one


class TopicEmbedder:
    """Cosine 1 between the question and the passage about its topic, 0 with the others (unit vectors by topic)."""

    def encode(self, texts, **kwargs):
        import numpy as np

        rows = np.zeros((len(texts), 50), dtype=np.float32)
        for row, text in enumerate(texts):
            rows[row, int(text.rstrip(".?").split()[-1]) % 50] = 1.0
        return rows


def test_cepe_reader_with_a_sharp_relevance_prior_reads_the_relevant_passage(tiny_chat_model, chat_tokenizer):
    """A prior all but on the passage the question is about: the logits are those of reading that passage alone;
    without the prior the other passages change them."""
    sharp = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy", relevance_temperature=0.001,
                             embedder=TopicEmbedder())
    plain = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy")
    question = "What is topic 3?"
    plan = sharp.prepare(question, PASSAGES[:5]).plan
    assert [p.id for p in plan.passages] == [0, 1, 2, 3, 4]
    assert max(range(5), key=plan.log_weights.__getitem__) == 3 and plan.log_weights[3] > -1e-9
    assert sharp.prepare(question, PASSAGES[3:4]).plan.log_weights is None  # one passage: nothing to weigh

    def first_logits(reader, passages):
        prepared = reader.prepare(question, passages)
        batch = reader.start([prepared], GenerationConfig(max_new_tokens=1))
        context = batch.forward_kwargs["cross_context"]
        with torch.no_grad():
            return reader.model(input_ids=torch.tensor([prepared.ids]), cross_context=context).logits

    alone = first_logits(plain, PASSAGES[3:4])
    torch.testing.assert_close(first_logits(sharp, PASSAGES[:5]), alone, rtol=0, atol=1e-4)
    assert (first_logits(plain, PASSAGES[:5]) - alone).abs().max() > 1e-3


def test_earlier_turns_go_through_the_chat_template(tiny_chat_model, chat_tokenizer):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from cepe_rag.integrations.langchain import ChatCepe

    conversation, question = ChatCepe.split_messages([
        SystemMessage("Be brief."), HumanMessage("Who built the bridge?"), AIMessage("Maria Tollund."),
        HumanMessage("When?")])
    assert conversation.system_prompt == "Be brief." and question == "When?"
    assert conversation.history == ({"role": "user", "content": "Who built the bridge?"},
                                    {"role": "assistant", "content": "Maria Tollund."})
    reader = ConcatReader(tiny_chat_model, chat_tokenizer)
    text = chat_tokenizer.decode(reader.prepare(question, PASSAGES[:1], conversation).ids)
    assert "Be brief." in text and reader.system_prompt not in text  # the request's system prompt, not the reader's
    assert ("<|im_start|>user\nWho built the bridge?<|im_end|>\n<|im_start|>assistant\nMaria Tollund.<|im_end|>"
            in text)
    assert text.index("Maria Tollund.") < text.index("Passage number 0") < text.index("Question: When?")


def test_one_table_describes_every_reader():
    """ReaderSpec's fields are what every reader's constructor takes: a new reader is its class and one READERS row."""
    import inspect

    from cepe_rag.readers import READERS
    from cepe_rag.settings import DEFAULT_FOCUS, ReaderSpec

    for name, reader_class in READERS.items():
        taken = set(inspect.signature(reader_class.__init__).parameters) | set(
            inspect.signature(Reader.__init__).parameters)
        assert set(ReaderSpec(reader=name).reader_options()) <= taken, name
    assert ReaderSpec(reader="parallel", ape_scale=0.5).reader_options() == {
        "prompt_style": "instruction", "ape_temperature": 1.0, "ape_scale": 0.5, "read_margin": 0.0,
        "focus": DEFAULT_FOCUS, "extractive": None}
