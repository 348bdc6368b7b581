"""CEPE context states stored at index time: written and removed with their passages, read per request, and
answers identical to encoding on the fly."""

import dataclasses
import sqlite3

import numpy as np
import pytest
import torch

from cepe_rag.cepe.states import StateEncoder, StoredStates, use_stored_states
from cepe_rag.indexes import IndexStore
from cepe_rag.retrieval import Retriever
from tests.pipelines.test_indexing import FACTS, corpus, index_with  # noqa: F401 -- the fixture
from tests.readers.conftest import tiny_chat_llama
from tests.readers.test_readers import tiny_cepe_reader

QUESTION = "Who directed 2001: A Space Odyssey?"


@pytest.fixture(scope="module")
def reader(chat_tokenizer):
    return tiny_cepe_reader(tiny_chat_llama(chat_tokenizer), chat_tokenizer, "copy")


def states_rows(index):
    with sqlite3.connect(index / "passages.sqlite") as db:
        return dict(db.execute("SELECT passage_id, tokens FROM context_states"))


def test_states_are_written_replaced_and_removed_with_their_passages(embedder, corpus, tmp_path, reader):  # noqa: F811
    index = tmp_path / "idx"
    encoder = StateEncoder(reader.model)
    summary = index_with(embedder, [corpus], index, state_encoder=encoder)
    store = IndexStore.open(index)
    assert summary.states_added == store.count() == len(states_rows(index)) == 4
    assert store.context_states_stamp() == reader.model.states_stamp()
    (corpus / "otters.md").write_text("Sea otters hold hands while they sleep so they do not drift apart.")
    (corpus / "everest.txt").unlink()
    summary = index_with(embedder, [corpus], index, state_encoder=encoder)
    assert summary.states_added == 1  # the changed document only
    rows = states_rows(index)
    assert sorted(rows) == sorted(int(i) for i in IndexStore.open(index).matching_ids())  # none left behind
    otters = Retriever(index, embedder=embedder, mode="lexical").retrieve("otters sleep", k=1)[0]
    stored = IndexStore.open(index).context_states([otters.id], encoder.hidden_size)[otters.id]
    fresh = reader.model.encode_context([otters.as_prompt_text()]).states[0]
    assert stored.dtype == np.float16 and stored.shape == tuple(fresh.shape)
    assert np.allclose(stored.astype(np.float32), fresh.float().numpy(), atol=2e-3, rtol=1e-3)


def test_passages_indexed_without_states_get_them_on_the_next_run(embedder, corpus, tmp_path, reader):  # noqa: F811
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    assert IndexStore.open(index).context_states_count() == 0
    (corpus / "new.txt").write_text("The Zorblax Gauge was calibrated in 1931.")
    summary = index_with(embedder, [corpus], index, state_encoder=StateEncoder(reader.model))
    assert summary.documents_embedded == 1 and summary.states_added == 5  # one new, four filled in
    assert IndexStore.open(index).context_states_count() == 5


def test_stored_states_give_the_answers_of_encoding_on_the_fly(embedder, corpus, tmp_path, reader,  # noqa: F811
                                                               monkeypatch):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index, state_encoder=StateEncoder(reader.model))
    passages = Retriever(index, embedder=embedder).retrieve(QUESTION, k=4)
    reader.context_states = None
    reader.encoded.states.clear()
    on_the_fly = reader.answer(QUESTION, passages).text
    reader.encoded.states.clear()
    assert use_stored_states(reader, IndexStore.open(index)) is None
    assert isinstance(reader.context_states, StoredStates)
    encoded = []
    original = reader.model.encode_token_chunks
    monkeypatch.setattr(reader.model, "encode_token_chunks", lambda ids, **kw: encoded.extend(ids) or original(ids))
    assert reader.answer(QUESTION, passages).text == on_the_fly
    assert encoded == []  # nothing encoded at question time
    changed = [passages[0].__class__(passages[0].id, "A different text under a stored id.", passages[0].title)]
    reader.answer(QUESTION, changed)
    assert len(encoded) == 1  # not the stored states of another text
    focused = dataclasses.replace(passages[1], focused_text=" ".join(reversed(passages[1].text.split())))
    assert focused.as_prompt_text() != passages[1].as_prompt_text()
    assert reader.context_states.states_for([focused]) == {}  # sentence focus reorders what the encoder reads
    reader.answer(QUESTION, [focused])
    assert len(encoded) == 2
    reader.context_states = None


def test_states_of_another_encoder_are_not_used(embedder, corpus, tmp_path, reader, chat_tokenizer):  # noqa: F811
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index, state_encoder=StateEncoder(reader.model))
    other = tiny_cepe_reader(tiny_chat_llama(chat_tokenizer), chat_tokenizer, "copy")
    with torch.no_grad():
        next(other.model.encoder.parameters()).add_(0.01)  # another encoder: its stamp differs
    assert "made by another encoder" in use_stored_states(other, IndexStore.open(index))
    assert other.context_states is None
    index_with(embedder, [corpus], index, state_encoder=StateEncoder(other.model))  # replaces them all
    store = IndexStore.open(index)
    assert store.context_states_stamp() == other.model.states_stamp() and store.context_states_count() == 4
    index_with(embedder, [corpus], tmp_path / "plain")
    assert "stores no context states" in use_stored_states(reader, IndexStore.open(tmp_path / "plain"))


def test_cross_attention_kv_cached_within_the_budget_and_absorbed_beyond(reader):
    from tests.readers.test_readers import PASSAGES

    states = [[reader.model.encode_context([p.as_prompt_text() for p in PASSAGES[:3]]).states[0]]]
    budget = reader.cross_kv_budget_mb
    reader.cross_kv_budget_mb = 1024
    assert reader.cross_kv_mode(states) == "cache"
    cached = reader.answer(QUESTION, PASSAGES[:6]).text
    reader.cross_kv_budget_mb = 0
    assert reader.cross_kv_mode(states) == "absorb"
    assert reader.answer(QUESTION, PASSAGES[:6]).text == cached
    reader.cross_kv_budget_mb = budget


def test_the_stamp_ignores_the_load_dtype(reader, chat_tokenizer):
    stamp = reader.model.states_stamp()
    assert stamp.startswith("encoder sha256:") and "chunks:256/right/True" in stamp
    halved = tiny_cepe_reader(tiny_chat_llama(chat_tokenizer), chat_tokenizer, "copy")
    halved.model.encoder.to(torch.bfloat16)
    assert halved.model.states_stamp() == stamp


def test_int8_states_take_half_the_bytes_and_switching_format_re_encodes(embedder, corpus, tmp_path,  # noqa: F811
                                                                          reader):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index, state_encoder=StateEncoder(reader.model))
    with sqlite3.connect(index / "passages.sqlite") as db:
        half = {pid: len(blob) for pid, blob in db.execute("SELECT passage_id, states FROM context_states")}
    summary = index_with(embedder, [corpus], index, state_encoder=StateEncoder(reader.model, state_format="int8"))
    assert summary.states_added == 4  # every passage again, in the new format
    store = IndexStore.open(index)
    assert store.context_states_format() == "int8"
    with sqlite3.connect(index / "passages.sqlite") as db:
        for pid, tokens, blob in db.execute("SELECT passage_id, tokens, states FROM context_states"):
            assert len(blob) == half[pid] // 2 + 4 * tokens  # one byte per value, plus a float32 scale per token
    ids = [int(i) for i in store.matching_ids()]
    quantised = store.context_states(ids, reader.model.encoder.config.hidden_size)
    for pid in ids:
        passage = store.passages([pid])[pid]
        fresh = reader.model.encode_context([passage.as_prompt_text()]).states[0].float().numpy()
        step = np.abs(fresh).max(axis=-1, keepdims=True) / 127  # one quantisation step per token row
        assert quantised[pid].dtype == np.float16
        assert np.all(np.abs(quantised[pid].astype(np.float32) - fresh) <= step / 2 + 2e-3 * np.abs(fresh) + 1e-4)
    assert index_with(embedder, [corpus], index,
                      state_encoder=StateEncoder(reader.model, state_format="int8")).states_added == 0
