"""RagSession: one question path (retrieve, abstain or read) with requests as data; follow-up retrieval."""

import pytest

from cepe_rag.pipelines.indexing import build_index
from cepe_rag.pipelines.session import RagSession, follow_up_search
from cepe_rag.readers import ConcatReader, GenerationConfig
from cepe_rag.retrieval import Abstention, Retriever
from cepe_rag.settings import NOT_IN_DOCUMENTS, ReaderSpec
from cepe_rag.types import Answer, CepeRagError, Conversation, split_messages
from tests.readers.conftest import tiny_chat_llama

FILES = {
    "tresk-viaduct.md": "# Tresk Viaduct\n\nThe Tresk Viaduct is a railway viaduct of eleven arches near the town of "
                        "Brannholm. It was designed by the engineer Ottilie Varga and carried its first train in 1911.",
    "brannholm.md": "# Brannholm\n\nBrannholm is a small lake town in the hills east of Tresk. Its mayor is Ruben "
                    "Kessel, and its weekly cheese market is the oldest in the district.",
    "lindqvar-optics.md": "# Lindqvar Optics\n\nLindqvar Optics is a maker of telescope mirrors based in Brannholm. "
                          "The company was founded in 1936 by Agnes Morrow and now has about eighty employees.",
    "otters.md": "# Sea otters\n\nSea otters use rocks as tools to open shellfish, and they sleep floating on their "
                 "backs holding paws.",
}


@pytest.fixture(scope="module")
def retriever(embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("session")
    (root / "docs").mkdir()
    for name, text in FILES.items():
        (root / "docs" / name).write_text(text)
    build_index([root / "docs"], root / "idx", embedder=embedder)
    return Retriever(root / "idx", embedder=embedder)


def file_of(passages):
    return passages[0].source.rsplit("/", 1)[-1]


def test_a_follow_up_is_searched_with_the_question_before_it(retriever):
    earlier = "Who designed the Tresk Viaduct?"
    alone = retriever.retrieve("When did it carry its first train?", 4)
    passages, query = follow_up_search(retriever, "When did it carry its first train?", earlier, 4)
    assert query == f"{earlier} When did it carry its first train?"
    assert file_of(passages) == "tresk-viaduct.md"
    assert alone[0].dense_score < passages[0].dense_score  # the joined query was the more similar one


def test_a_new_subject_is_searched_alone(retriever):
    passages, query = follow_up_search(retriever, "Who is the mayor of Brannholm?", "Who designed the Tresk Viaduct?",
                                       4)
    assert query == "Who is the mayor of Brannholm?" and file_of(passages) == "brannholm.md"


def test_without_an_earlier_question_or_by_bm25_the_question_is_searched_alone(retriever):
    assert follow_up_search(retriever, "When did it open?", None, 2)[1] == "When did it open?"
    lexical = Retriever(retriever.store, mode="lexical")
    assert follow_up_search(lexical, "When did it open?", "Who designed the Tresk Viaduct?", 2)[1] == \
        "When did it open?"


def test_split_messages_is_one_rule_for_the_server_and_langchain():
    conversation, question = split_messages([("system", "Be brief."), ("user", "Who built it?"),
                                             ("assistant", "Varga."), ("developer", "Cite."), ("user", "When?")])
    assert question == "When?" and conversation.system_prompt == "Be brief.\nCite."
    assert conversation.history == ({"role": "user", "content": "Who built it?"},
                                    {"role": "assistant", "content": "Varga."})
    assert conversation.then("When?", "1911").history[-1] == {"role": "assistant", "content": "1911"}
    for messages in ([], [("system", "x")], [("user", "q"), ("assistant", "a")]):
        with pytest.raises(CepeRagError, match="must be the user's question"):
            split_messages(messages)


@pytest.fixture(scope="module")
def session(retriever, chat_tokenizer):
    model = tiny_chat_llama(chat_tokenizer, initializer_range=0.2)
    reader = ConcatReader(model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=6))
    return RagSession(reader, retriever, abstention=Abstention(floor=0.3), k=3)


def test_stream_yields_the_text_then_the_answer_and_answer_equals_it(session):
    items = list(session.stream("Who is the mayor of Brannholm?"))
    *deltas, answer = items
    assert isinstance(answer, Answer) and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas).strip() == answer.text
    assert answer.usage["passages_retrieved"] == 3 and answer.read_rule.startswith("read ")
    again = session.answer("Who is the mayor of Brannholm?")
    assert again.text == answer.text and [p.id for p in again.passages] == [p.id for p in answer.passages]


def test_the_conversation_reaches_the_prompt_and_the_reader_keeps_nothing(session):
    reader = session.reader()
    conversation = Conversation("Answer in Latin.", ({"role": "user", "content": "Who designed the Tresk Viaduct?"},
                                                     {"role": "assistant", "content": "Ottilie Varga."}))
    prompt = reader.tokenizer.decode(reader.prepare("When?", [], conversation).ids)
    assert "Answer in Latin." in prompt and "Ottilie Varga." in prompt and reader.system_prompt not in prompt
    session.answer("When did it carry its first train?", conversation=conversation)
    assert "Ottilie" not in reader.tokenizer.decode(reader.prepare("When?", []).ids)  # nothing stuck to the reader
    assert not hasattr(reader, "history")


def test_abstains_without_the_model_and_reads_the_callers_own_passages(session):
    streamed = []
    refused = session.answer("What do the Zyxqor glimmerbacks eat?", on_token=streamed.append)
    assert refused.text == NOT_IN_DOCUMENTS == "".join(streamed)
    assert refused.abstained and refused.read_rule.startswith("no passage read: ")
    assert refused.usage["decode_steps"] == 0 and refused.passages  # the sources are still shown
    own = session.search("Sea otters", 1)
    read = session.answer("What do the Zyxqor glimmerbacks eat?", passages=own)
    assert not read.abstained and read.usage["passages_read"] == 1  # a caller's own passages are always read


def test_sentence_focus_reorders_what_a_focusing_reader_reads_and_nothing_else(session, retriever):
    question = "Who designed the Tresk Viaduct?"
    plain = session.answer(question)
    assert plain.passages[0].focused_text is None  # the default reads passages as they are
    base = session.reader()
    focusing = ConcatReader(base.model, base.tokenizer, generation=base.generation, read_margin=0.0, focus=True)
    both = RagSession({"plain": base, "focus": focusing}, retriever, abstention=None, k=3)
    answer = both.answer(question, reader="focus")
    read = answer.passages[0]  # the cutoff reads the viaduct's file alone
    assert read.focused_text.startswith("It was designed by the engineer Ottilie Varga")
    assert read.text.startswith("The Tresk Viaduct is a railway viaduct")  # sources keep the text
    assert answer.read_rule.endswith("(sentence focus)") and "sentence focus" not in plain.read_rule
    prompt = base.tokenizer.decode(focusing.prepare(question, answer.passages).ids)
    assert prompt.index("Ottilie Varga") < prompt.index("eleven arches")
    own = both.answer(question, reader="focus", passages=retriever.retrieve(question, 3))  # eval's path
    assert own.passages[0].focused_text == read.focused_text
    found = both.passages_for(question, reader="focus", k=3)  # serve's path: only the passages read are focused
    assert found.passages[0].focused_text and all(p.focused_text is None for p in found.passages[1:])
    assert all(p.focused_text is None for p in both.passages_for(question, reader="plain", k=3).passages)


def test_a_session_refuses_unknown_readers_and_k_below_one(session):
    with pytest.raises(CepeRagError, match="no reader 'cepe'"):
        session.answer("q?", reader="cepe")
    with pytest.raises(CepeRagError, match="k must be at least 1"):
        session.passages_for("q?", k=0)


def test_open_refuses_settings_that_cannot_work_before_any_model_loads(monkeypatch):
    import cepe_rag.pipelines.session as session_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(session_module, "build_reader", no_loading)
    for specs, options, message in [([ReaderSpec(), ReaderSpec(reader="poem")], {}, "unknown reader 'poem'"),
                                    ([ReaderSpec()], {"dtype": "float8"}, "unknown dtype"),
                                    ([ReaderSpec()], {"retrieval": "psychic"}, "unknown retrieval mode"),
                                    ([ReaderSpec()], {"k": 0}, "k must be at least 1"),
                                    ([ReaderSpec(decoder="./no/such/folder")], {}, "no such folder")]:
        with pytest.raises(CepeRagError, match=message):
            RagSession.open(None, specs, **options)
    with pytest.raises(CepeRagError, match="unknown prompt style"):
        ReaderSpec(prompt_style="sonnet")
