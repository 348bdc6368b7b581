"""Lexical (BM25) and hybrid retrieval, metadata filters and abstention, on a four-file corpus."""

import sqlite3

import pytest

from cepe_rag.indexes import IndexStore
from cepe_rag.indexes.passage_db import lexical_query
from cepe_rag.pipelines.indexing import build_index
from cepe_rag.pipelines.session import RagSession
from cepe_rag.retrieval import Abstention, PassageFilter, Retriever, fuse
from cepe_rag.settings import NOT_IN_DOCUMENTS
from cepe_rag.types import CepeRagError, Passage
from tests.pipelines.test_indexing import corpus, index_with  # noqa: F401 -- the fixture

ZORBLAX = "The Zorblax Gauge was calibrated by Ottilie Brandquist in 1931."


def titles(passages):
    return [p.title for p in passages]


def test_lexical_search_finds_an_exact_rare_name(embedder, corpus, tmp_path):  # noqa: F811
    (corpus / "zorblax.txt").write_text(ZORBLAX)
    index_with(embedder, [corpus], tmp_path / "idx")
    lexical = Retriever(tmp_path / "idx", mode="lexical")
    assert lexical.embedder is None  # BM25 alone loads no model
    found = lexical.retrieve("Who calibrated the Zorblax gauge?", k=4)
    assert titles(found)[0] == "zorblax"
    assert len(found) == 1  # only passages sharing a word with the question
    assert found[0].score > 0


def test_lexical_index_follows_every_change(embedder, corpus, tmp_path):  # noqa: F811
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    lexical = Retriever(index, mode="lexical")
    assert lexical.retrieve("Zorblax", k=3) == []
    (corpus / "zorblax.txt").write_text(ZORBLAX)  # added
    index_with(embedder, [corpus], index)
    assert titles(Retriever(index, mode="lexical").retrieve("Zorblax", k=3)) == ["zorblax"]
    (corpus / "zorblax.txt").write_text("The Quimbly Gauge was calibrated in 1931.")  # modified
    index_with(embedder, [corpus], index)
    assert Retriever(index, mode="lexical").retrieve("Ottilie Brandquist", k=3) == []
    assert titles(Retriever(index, mode="lexical").retrieve("Quimbly", k=3)) == ["zorblax"]
    (corpus / "zorblax.txt").unlink()  # deleted
    index_with(embedder, [corpus], index)
    assert Retriever(index, mode="lexical").retrieve("Quimbly", k=3) == []
    with sqlite3.connect(index / "passages.sqlite") as db:  # the FTS index holds exactly the passages
        assert db.execute("SELECT COUNT(*) FROM passages_fts").fetchone()[0] == 4
        db.execute("INSERT INTO passages_fts(passages_fts) VALUES ('integrity-check')")


def test_an_index_from_before_lexical_search_is_upgraded_by_the_next_run(embedder, corpus, tmp_path):  # noqa: F811
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    with sqlite3.connect(index / "passages.sqlite") as db:  # what an older cepe-rag wrote
        for name in ("passages_fts_insert", "passages_fts_delete"):
            db.execute(f"DROP TRIGGER {name}")
        db.execute("DROP TABLE passages_fts")
    old = Retriever(index, embedder=embedder)
    assert old.lexical_missing and old.mode == "dense"  # hybrid falls back, and says so through the flag
    with pytest.raises(CepeRagError, match="run `cepe-rag index` on it once"):
        Retriever(index, mode="lexical").retrieve("Kubrick", k=1)
    summary = index_with(embedder, [corpus], index)
    assert summary.documents_embedded == 0  # nothing re-embedded
    assert titles(Retriever(index, mode="lexical").retrieve("Kubrick", k=1)) == ["kubrick"]


def test_lexical_queries_cannot_inject_fts_syntax():
    assert lexical_query('the "Kubrick" OR NEAR(film* -x) AND') == '"kubrick" OR "near" OR "film" OR "x"'
    assert lexical_query("what is the?") == ""


def test_question_of_only_stopwords_finds_nothing_lexically(embedder, corpus, tmp_path):  # noqa: F811
    index_with(embedder, [corpus], tmp_path / "idx")
    assert Retriever(tmp_path / "idx", mode="lexical").retrieve("what is it?", k=3) == []


def test_reciprocal_rank_fusion():
    a, b, c = (Passage(id=i, text=str(i)) for i in range(3))
    dense = [Passage(id=0, text="0", score=0.9), Passage(id=1, text="1", score=0.8)]
    lexical = [Passage(id=1, text="1", score=12.0), Passage(id=2, text="2", score=3.0)]
    fused = fuse(dense, lexical)
    assert [p.id for p in fused] == [1, 0, 2]  # found by both lists first
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert (fused[0].dense_score, fused[0].lexical_score) == (0.8, 12.0)
    assert (fused[2].dense_score, fused[2].lexical_score) == (None, 3.0)
    assert [p.id for p in fuse(dense, lexical, lexical_weight=0.0)] == [0, 1, 2]  # weight 0: the dense order


def test_hybrid_results_carry_both_scores(embedder, corpus, tmp_path):  # noqa: F811
    (corpus / "zorblax.txt").write_text(ZORBLAX)
    index_with(embedder, [corpus], tmp_path / "idx")
    found = Retriever(tmp_path / "idx", embedder=embedder).retrieve("Who calibrated the Zorblax gauge?", k=5)
    assert titles(found)[0] == "zorblax"
    assert len(found) == 5
    assert all(p.dense_score is not None for p in found)  # cosine filled in for BM25-only hits too
    dense = {p.id: p.dense_score for p in Retriever(tmp_path / "idx", embedder=embedder, mode="dense").retrieve(
        "Who calibrated the Zorblax gauge?", k=5)}
    assert all(p.dense_score == pytest.approx(dense[p.id], abs=1e-5) for p in found)


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_filters_keep_only_matching_passages(embedder, corpus, tmp_path, mode):  # noqa: F811
    index_with(embedder, [corpus], tmp_path / "idx")
    question = "Kubrick film Eiffel tower otters Everest"
    only_md = Retriever(tmp_path / "idx", embedder=embedder, mode=mode, filters=PassageFilter(source="*.md"))
    assert titles(only_md.retrieve(question, k=4)) == ["otters"]
    by_title = Retriever(tmp_path / "idx", embedder=embedder, mode=mode, filters=PassageFilter(title="e*"))
    assert sorted(titles(by_title.retrieve(question, k=4))) == ["eiffel", "everest"]
    nothing = Retriever(tmp_path / "idx", embedder=embedder, mode=mode, filters=PassageFilter(source="*.pdf"))
    assert nothing.retrieve(question, k=4) == []


def test_unknown_mode_is_refused(embedder, corpus, tmp_path):  # noqa: F811
    index_with(embedder, [corpus], tmp_path / "idx")
    with pytest.raises(CepeRagError, match="unknown retrieval mode 'fuzzy'"):
        Retriever(tmp_path / "idx", embedder=embedder, mode="fuzzy")


class EchoReader:
    """Reads passages; answers with the first passage's title (no model needed)."""

    name = "echo"
    reads_passages = True
    focus = False

    def prepare_request(self, question, passages, conversation=None):
        return None

    def answer_stream(self, question, passages, **_):
        from cepe_rag.types import Answer

        yield Answer(passages[0].title if passages else "", list(passages), self.name)


def test_abstains_when_no_passage_is_relevant_enough(embedder, corpus, tmp_path):  # noqa: F811
    index_with(embedder, [corpus], tmp_path / "idx")
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    on_topic = "Who directed 2001: A Space Odyssey?"
    off_topic = "What is the mascot of the Quorvath goat racing league?"
    best = {q: max(p.dense_score for p in retriever.retrieve(q, k=2)) for q in (on_topic, off_topic)}
    assert best[on_topic] > best[off_topic]
    floor = (best[on_topic] + best[off_topic]) / 2
    pipeline = RagSession(EchoReader(), retriever, abstention=Abstention(below=0.0, floor=floor), k=2)
    assert pipeline.answer(on_topic).text == "kubrick"
    streamed = []
    refused = pipeline.answer(off_topic, on_token=streamed.append)
    assert refused.text == NOT_IN_DOCUMENTS == "".join(streamed)
    assert refused.abstained.startswith("the best passage's similarity to the question is")
    assert len(refused.passages) == 2  # the sources are still shown, with their scores
    assert not RagSession(EchoReader(), retriever, abstention=None).answer(off_topic, k=2).abstained


def test_abstains_below_the_higher_threshold_only_for_words_no_document_contains(embedder, corpus,  # noqa: F811
                                                                                 tmp_path):
    index_with(embedder, [corpus], tmp_path / "idx")
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    assert retriever.unknown_words("Who painted the Quorvath otters?") == ["painted", "quorvath"]
    assert retriever.unknown_words("Which tools do sea otters use?") == []  # "tools" matches "tool" (stemmed)
    assert retriever.unknown_words("Do otters use rocks?") == []
    strict = RagSession(EchoReader(), retriever, abstention=Abstention(below=0.99, floor=0.0), k=1)
    assert strict.answer("Do otters use rocks?").text == "otters"  # every word is in the documents: read
    refused = strict.answer("Who painted the Quorvath otters?")
    assert refused.abstained.startswith("no document contains 'painted', 'quorvath'")


def test_lexical_retrieval_never_abstains(embedder, corpus, tmp_path):  # noqa: F811
    index_with(embedder, [corpus], tmp_path / "idx")
    lexical = Retriever(tmp_path / "idx", mode="lexical")
    pipeline = RagSession(EchoReader(), lexical, abstention=Abstention(below=1.0, floor=1.0), k=1)
    assert pipeline.answer("Quorvath otters?").text == "otters"  # no cosine to judge by


def test_store_embeddings_are_the_indexed_vectors(embedder, corpus, tmp_path):  # noqa: F811
    index_with(embedder, [corpus], tmp_path / "idx")
    store = IndexStore.open(tmp_path / "idx")
    ids = [int(i) for i in store.matching_ids()]
    vectors = store.embeddings(ids[::-1])
    assert vectors.shape == (4, store.manifest.dimension)
    assert abs(float((vectors ** 2).sum(1).mean()) - 1.0) < 1e-5
    assert (store.embeddings(ids[:1]) == vectors[-1:]).all()


def test_build_index_writes_the_lexical_index(embedder, corpus, tmp_path):  # noqa: F811
    build_index([str(corpus)], tmp_path / "idx", embedder=embedder)
    assert IndexStore.open(tmp_path / "idx").has_lexical_index


def test_sentence_focus_leads_with_the_sentence_the_question_asks_about(embedder):
    from cepe_rag.retrieval.focus import focus_passages, sentences, without_title

    assert sentences("Dr. Smith paid $3.5 million in Jan. 2001 for it. It was late.") == [
        "Dr. Smith paid $3.5 million in Jan. 2001 for it.", "It was late."]  # abbreviations and decimals hold
    assert without_title("Who designed the Quorvath Bridge?", "Quorvath Bridge (Elmsfeld)") == "Who designed the ?"
    river = Passage(1, "The Gaerkkevora River is a river in Daeskbrysa. It rises on the slopes of Mount Reivsuxund "
                       "and flows for 174 kilometres before emptying into Lake Nunstandov. Its valley is known for "
                       "orchards and old water mills.", title="Gaerkkevora River")
    single = Passage(2, "Elmsfeld is a town.", title="Elmsfeld")
    focused = focus_passages("Into which lake does the Gaerkkevora River flow?", [river, single], embedder)
    assert focused[0].focused_text == ("It rises on the slopes of Mount Reivsuxund and flows for 174 kilometres "
                                       "before emptying into Lake Nunstandov. " + river.text)  # then all of it
    assert focused[0].text == river.text and focused[0].id == 1  # sources show the passage as it is
    assert focused[0].as_prompt_text() == f"Document (Title: Gaerkkevora River): {focused[0].focused_text}"
    assert focused[1] is single and single.focused_text is None  # one sentence: nothing to lead with
    # Asked what the first sentence says, the passage is read as it is.
    assert focus_passages("In which country is the Gaerkkevora River?", [river], embedder)[0].focused_text is None
    assert focus_passages("anything", [], embedder) == []
