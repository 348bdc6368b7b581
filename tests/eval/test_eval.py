import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cepe_rag.eval import (
    QAExample,
    exact_match,
    load_questions,
    normalize_answer,
    run_eval,
    substring_match,
    token_f1,
)
from cepe_rag.eval.metrics import answer_in_passages, paired_bootstrap, postprocess
from cepe_rag.eval.runner import answerable_subset
from cepe_rag.pipelines.indexing import build_index
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import ClosedBookReader, ConcatReader, GenerationConfig
from cepe_rag.retrieval import Retriever
from cepe_rag.types import CepeRagError


def test_squad_normalisation_and_metrics():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert exact_match("the Stanley Kubrick.", ["Stanley Kubrick"]) == 1.0
    assert exact_match("Kubrick directed it", ["Stanley Kubrick"]) == 0.0
    assert substring_match("It was directed by Stanley Kubrick in 1968", ["stanley kubrick"]) == 1.0
    assert substring_match("Nobody", ["Kubrick"]) == 0.0
    assert token_f1("Stanley Kubrick", ["Kubrick"]) == pytest.approx(2 / 3)
    assert token_f1("", ["x"]) == 0.0
    assert answer_in_passages(["... directed by Stanley Kubrick ..."], ["Stanley Kubrick"])
    assert postprocess(' "Paris"\nThe capital') == "Paris"


def test_load_flashrag_and_nq_open_formats(tmp_path):
    flashrag = tmp_path / "f.jsonl"
    flashrag.write_text(json.dumps({"id": "q1", "question": "Who?", "golden_answers": ["A", "B"]}) + "\n")
    nq = tmp_path / "nq.jsonl"
    nq.write_text(json.dumps({"question": "What?", "answer": ["C"]}) + "\n" +
                  json.dumps({"question": "Where?", "answer": ["D"]}) + "\n")
    assert [(q.id, q.answers) for q in load_questions(str(flashrag))] == [("q1", ["A", "B"])]
    assert [q.question for q in load_questions(str(nq), limit=1)] == ["What?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no question"}) + "\n")
    with pytest.raises(CepeRagError, match="no question or answers"):
        load_questions(str(bad))


def test_real_nq_open_dev_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl"
    if not path.exists():
        pytest.skip("shared data not present")
    questions = load_questions(str(path))
    assert len(questions) == 3610 and questions[0].answers


def tiny_decoder(tokenizer) -> LlamaForCausalLM:
    """A one-layer random Llama over the real tokenizer: the harness is under test, not the answers."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=512)).eval()


class CountingReader(ConcatReader):
    calls = 0

    def answer_stream(self, question, passages, **kwargs):  # what RagSession.answer reads through
        CountingReader.calls += 1
        return super().answer_stream(question, passages, **kwargs)


def test_run_eval_writes_reports_and_resumes(tmp_path, embedder, chat_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, fact in enumerate(["Kubrick directed 2001.", "Paris is in France.", "Otters swim.", "Rome is old."]):
        (corpus / f"{i}.txt").write_text(fact)
    build_index([corpus], tmp_path / "idx", embedder=embedder)
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    questions_file = tmp_path / "q.jsonl"
    questions_file.write_text("\n".join(json.dumps(q) for q in [
        {"question": "Who directed 2001?", "answer": ["Kubrick"]},
        {"question": "Where is Paris?", "answer": ["France"]},
        {"question": "Capital of Mars?", "answer": ["Olympus"]},
    ]))
    questions = load_questions(str(questions_file))
    assert [q.question for q in answerable_subset(questions, retriever)] == ["Who directed 2001?", "Where is Paris?"]
    torch.manual_seed(0)
    model = tiny_decoder(chat_tokenizer)
    reader = CountingReader(model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=3, stop_strings=("\n",)))
    rows = run_eval(questions, RagSession({"concat": reader}, retriever), [1, 2], tmp_path / "run")
    assert CountingReader.calls == 6
    assert [(r["k"], r["n"]) for r in rows] == [(1, 3), (2, 3)]
    recall_at_1 = rows[0]["recall_at_k"]
    assert recall_at_1 == pytest.approx(100 * 2 / 3, abs=0.1)  # the Mars answer is nowhere in the corpus
    for name in ("summary.json", "summary.md", "accuracy_vs_k.png", "retrieval.jsonl", "predictions/concat_k1.jsonl"):
        assert (tmp_path / "run" / name).exists()

    # Interrupted mid-file: a cut last line is redone, finished questions are not.
    predictions = tmp_path / "run" / "predictions" / "concat_k2.jsonl"
    lines = predictions.read_text().splitlines()
    predictions.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    again = run_eval(questions, RagSession({"concat": reader}, retriever), [1, 2], tmp_path / "run")
    assert CountingReader.calls == 7
    metrics = ("reader", "k", "n", "em", "substring_em", "f1", "recall_at_k")
    assert [{m: r[m] for m in metrics} for r in again] == [{m: r[m] for m in metrics} for r in rows]

    # A later run with another reader: the folder's summary keeps the earlier rows too.
    closed = ClosedBookReader(model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=3))
    run_eval(questions, RagSession({"closed-book": closed}, retriever), [1], tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = [(r["reader"], r["k"], r["n"]) for r in summary]
    assert rows == [("closed-book", 0, 3), ("concat", 1, 3), ("concat", 2, 3)]
    record = json.loads((tmp_path / "run" / "predictions" / "concat_k2.jsonl").read_text().splitlines()[0])
    assert (record["reader"], record["k"]) == ("concat", 2)  # the summary reads them from here, not the file name


def test_run_folder_refuses_other_settings_and_other_index(tmp_path, embedder, chat_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Kubrick directed 2001.")
    build_index([corpus], tmp_path / "idx", embedder=embedder)
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    questions = [QAExample(id="1", question="Who directed 2001?", answers=["Kubrick"])]
    model = tiny_decoder(chat_tokenizer)
    closed = ClosedBookReader(model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=2))
    run, session = tmp_path / "run", RagSession({"closed-book": closed}, retriever)
    run_eval(questions, session, [1], run, settings={"closed-book": {"decoder": "a"}})
    answers = (run / "predictions" / "closed-book_k0.jsonl").read_bytes()

    with pytest.raises(CepeRagError, match=r"other settings \(decoder 'a' -> 'b'\)"):
        run_eval(questions, session, [1], run, settings={"closed-book": {"decoder": "b"}})
    run_eval(questions, session, [1], run, settings={"closed-book": {"decoder": "a"}})
    with pytest.raises(CepeRagError, match=r"hybrid retrieval\), not .*dense retrieval\)"):
        dense = Retriever(tmp_path / "idx", embedder=embedder, mode="dense")
        run_eval(questions, RagSession({"closed-book": closed}, dense), [1], run,
                 settings={"closed-book": {"decoder": "a"}})

    (corpus / "b.txt").write_text("Paris is in France.")
    build_index([corpus], tmp_path / "idx", embedder=embedder)
    stale = r"was retrieved from .*\(version 1, 1 passages, hybrid retrieval\), not .*\(version 2, 2 passages, hybrid"
    with pytest.raises(CepeRagError, match=stale):
        reopened = Retriever(tmp_path / "idx", embedder=embedder)
        run_eval(questions, RagSession({"closed-book": closed}, reopened), [1], run,
                 settings={"closed-book": {"decoder": "a"}})
    assert (run / "predictions" / "closed-book_k0.jsonl").read_bytes() == answers

    (run / "run.json").write_text("{not json")
    with pytest.raises(CepeRagError, match="not a run settings file"):
        run_eval(questions, RagSession({"closed-book": closed}, retriever), [1], run)


def test_paired_bootstrap_interval():
    same = [1.0, 0.0] * 50
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    better = [1.0] * 30 + [0.0] * 70
    worse = [0.0] * 100
    mean, low, high = paired_bootstrap(better, worse)
    assert mean == pytest.approx(30.0) and 20 < low < 30 < high < 40
    # One disagreement in 100 is noise: the interval covers 0.
    mean, low, high = paired_bootstrap([1.0] + [0.0] * 99, worse)
    assert low <= 0 <= high
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [])


def test_the_harness_reads_with_the_relevance_cutoff_as_ask_does(tmp_path, embedder, chat_tokenizer):
    """The cached retrieval keeps each passage's dense similarity, so a reader with a cutoff reads what `ask` would
    read (an unrelated passage is left out), not all k; a cache from before that is retrieved again."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, fact in enumerate(["Kubrick directed the film 2001.", "Otters swim in rivers.", "Rome is an old city."]):
        (corpus / f"{i}.txt").write_text(fact)
    build_index([corpus], tmp_path / "idx", embedder=embedder)
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    questions = [QAExample(id="1", question="Who directed the film 2001?", answers=["Kubrick"])]
    model = tiny_decoder(chat_tokenizer)
    generation = GenerationConfig(max_new_tokens=2)
    cut = ConcatReader(model, chat_tokenizer, generation=generation, read_margin=0.0)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "retrieval.jsonl").write_text(json.dumps({"id": "1", "hits": [[0, 0.5], [1, 0.4], [2, 0.3]]}) + "\n")
    rows = run_eval(questions, RagSession({"concat": cut}, retriever), [3], run)
    assert rows[0]["passages_read"] == 1
    hits = json.loads((run / "retrieval.jsonl").read_text().splitlines()[-1])["hits"]
    assert len(hits) == 3 and all(len(hit) == 3 and isinstance(hit[2], float) for hit in hits)
