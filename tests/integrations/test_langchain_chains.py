"""LCEL composition with the LangChain adapters, on the packaged default models.

What the 135M decoder answers rests, for most questions, on near-ties between its two best next tokens (issue 29:
"Steven Spielberg" instead of "Stanley Kubrick" on an AMD EPYC, 0.02 nats apart in float32 here), which another
CPU's kernels or bfloat16 can flip. So these tests check the adapters' plumbing exactly: the passages reach the
decoder's prompt (read back from the prompt tokens), and what the adapters return is, character for character,
the reader's own answer for the same question, passages and settings (the same code path and shapes, so exact on
any CPU). One content check remains (`test_contexts_reach_the_reader_not_the_prompt`), in float32, on a passage
and question where every runner-up token within 2 nats still leads to the asserted name
(`python benchmarks/answer_margins.py`; docs/tests.md).
"""

import pytest
import torch
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.vectorstores import InMemoryVectorStore

from cepe_rag.integrations.langchain import CepeLLM, CepeRetriever, ChatCepe, rag_chain
from cepe_rag.models import resolve_dtype
from cepe_rag.readers import GenerationConfig, Reader, build_reader
from cepe_rag.readers.base import SYSTEM_PROMPT
from cepe_rag.settings import NOT_IN_DOCUMENTS, ReaderSpec
from cepe_rag.types import Passage
from tests.integrations.test_langchain_standard import small_index

pytestmark = pytest.mark.real_models

# The passage as `cepe-rag index` makes it of a file film.txt (the title is the file's stem): the decoder's answer
# to QUESTION from it, "The film is directed by Stanley Kubrick.", survives any one runner-up token within 2 nats
# of the best, in float32 and bfloat16, given 32 tokens (with 16, quoting the passage first runs out of tokens).
# With the title "2001: A Space Odyssey" it is 0.45 nats from "... is a classic film" (no name at all).
FILM_TEXT = "2001: A Space Odyssey is a 1968 science fiction film directed by Stanley Kubrick."
FILM = [Document(page_content=FILM_TEXT, metadata={"title": "film"})]
FILM_PASSAGES = [Passage(id=0, text=FILM_TEXT, title="film")]  # what the adapters must turn FILM into
QUESTION = "Who directed 2001: A Space Odyssey?"


def reader_answer(question, passages, *, max_tokens=16, dtype=None, system_prompt=None) -> str:
    """The reader's own answer, built without the adapters: what they must return, exactly."""
    reader = build_reader(ReaderSpec(), generation=GenerationConfig(max_new_tokens=max_tokens),
                          dtype=resolve_dtype(dtype, "cpu"), system_prompt=system_prompt)
    return reader.answer(question, passages).text


@pytest.fixture
def prompts(monkeypatch):
    """The decoded prompt of every request a reader decodes from here on: what reached the decoder."""
    seen = []
    decode = Reader.stream_prepared

    def spy(self, prepared, config):
        seen.extend(self.tokenizer.decode(p.ids) for p in prepared)
        yield from decode(self, prepared, config)

    monkeypatch.setattr(Reader, "stream_prepared", spy)
    return seen


@pytest.fixture(scope="module")
def llm():
    return CepeLLM(max_tokens=16)  # the dtype this CPU defaults to (or CEPE_RAG_DTYPE's): plumbing checks only


def test_contexts_reach_the_reader_not_the_prompt(prompts):
    llm = CepeLLM(max_tokens=32, dtype="float32")  # a content check: float32 (see FILM)
    assert llm.session().reader().model.dtype == torch.float32
    result = llm.generate([QUESTION], contexts=FILM)
    generation = result.generations[0][0]
    assert "Kubrick" in generation.text
    assert generation.generation_info["passages_read"] == 1
    assert FILM_TEXT in prompts[0] and QUESTION in prompts[0] and SYSTEM_PROMPT in prompts[0]
    assert generation.text == reader_answer(QUESTION, FILM_PASSAGES, max_tokens=32, dtype="float32")
    closed = llm.generate([QUESTION])  # no contexts, no retriever: nothing read
    assert closed.generations[0][0].generation_info["passages_read"] == 0
    assert QUESTION in prompts[-1] and "Kubrick" not in prompts[-1]


def test_lcel_prompt_llm_parser_with_bound_contexts(llm, prompts):
    chain = PromptTemplate.from_template("Who directed {film}?") | llm.bind(contexts=FILM) | StrOutputParser()
    answer = chain.invoke({"film": "2001: A Space Odyssey"})
    assert FILM_TEXT in prompts[0] and QUESTION in prompts[0]  # the template filled in, the bound passage read
    questions = [QUESTION, "Who directed the 1968 film 2001?"]
    answers = chain.batch([{"film": "2001: A Space Odyssey"}, {"film": "the 1968 film 2001"}])
    assert len(prompts) == 3 and all(FILM_TEXT in prompt for prompt in prompts[1:]) and questions[1] in prompts[2]
    chunks = list(chain.stream({"film": "2001: A Space Odyssey"}))
    assert len(chunks) > 1 and "".join(chunks).strip() == answer == reader_answer(QUESTION, FILM_PASSAGES)
    reader = build_reader(ReaderSpec(), generation=GenerationConfig(max_new_tokens=16),
                          dtype=resolve_dtype(None, "cpu"))
    # LangChain's batch is one call with both prompts, so one padded batch of two rows, as here.
    assert answers == [a.text for a in reader.answer_batch(questions, [FILM_PASSAGES] * 2)]


async def test_astream_and_ainvoke(llm):
    chunks = [chunk async for chunk in llm.astream(QUESTION, contexts=FILM)]
    answer = await llm.ainvoke(QUESTION, contexts=FILM)
    assert len(chunks) > 1 and "".join(chunks).strip() == answer == reader_answer(QUESTION, FILM_PASSAGES)


def test_llm_retrieves_for_itself_when_given_a_retriever(prompts):
    llm = CepeLLM.from_index(small_index(), k=1, max_tokens=16)
    result = llm.generate([QUESTION])
    assert result.generations[0][0].generation_info["passages_read"] == 1
    assert result.generations[0][0].generation_info["sources"][0].endswith("0.txt")
    assert "Stanley Kubrick directed 2001: A Space Odyssey." in prompts[0]  # the retrieved passage, in the prompt
    found = CepeRetriever(index=small_index(), k=1).invoke(QUESTION)
    passages = [Passage(id=0, text=found[0].page_content, title=found[0].metadata["title"])]
    assert result.generations[0][0].text == reader_answer(QUESTION, passages)


def test_an_llm_over_an_index_abstains_as_ask_does(prompts):
    index = small_index()
    llm = CepeLLM.from_index(index, k=2, max_tokens=16, spec=ReaderSpec(prompt_style="fewshot"), ape_scale=0.5)
    assert llm.spec.prompt_style == "fewshot" and llm.spec.ape_scale == 0.5  # any ReaderSpec field, one by one too
    result = llm.generate(["What do the Zyxqor glimmerbacks of Vellmoor eat?"])
    info = result.generations[0][0].generation_info
    assert result.generations[0][0].text == NOT_IN_DOCUMENTS and info["abstained"] and info["passages_read"] == 0
    assert prompts == []  # the decoder never ran
    chat = ChatCepe(llm=CepeLLM.from_index(index, k=2, max_tokens=16, abstain=False))
    assert chat.invoke("What do the Zyxqor glimmerbacks of Vellmoor eat?").content != NOT_IN_DOCUMENTS


def test_rag_chain_returns_answer_and_sources(prompts):
    chain = rag_chain(CepeRetriever(index=small_index(), k=1), CepeLLM(max_tokens=16))
    output = chain.invoke(QUESTION)
    source = output["source_documents"][0]
    assert source.metadata["source"].endswith("0.txt") and source.metadata["score"] > 0
    assert source.page_content in prompts[0]
    assert output["answer"] == reader_answer(QUESTION, [Passage(id=0, text=source.page_content,
                                                                title=source.metadata["title"])])


def test_any_vector_store_retriever_is_a_passage_source(prompts):
    from cepe_rag.models import load_embedder

    embedder = load_embedder()

    class MiniLM:  # the LangChain Embeddings interface over our embedder
        def embed_documents(self, texts):
            return embedder.encode(texts, normalize_embeddings=True).tolist()

        def embed_query(self, text):
            return self.embed_documents([text])[0]

    store = InMemoryVectorStore(MiniLM())
    store.add_texts(["Stanley Kubrick directed 2001: A Space Odyssey.", "Otters hold hands while sleeping."])
    llm = CepeLLM(retriever=store.as_retriever(search_kwargs={"k": 1}), max_tokens=16)
    answer = llm.invoke(QUESTION)
    assert "Stanley Kubrick directed" in prompts[0] and "Otters" not in prompts[0]  # the k=1 nearest, only
    assert answer == reader_answer(QUESTION, [Passage(id=0, text="Stanley Kubrick directed 2001: A Space Odyssey.")])


def test_chat_model_streams_chunks_with_contexts(prompts):
    chat = ChatCepe(max_tokens=16)
    messages = [("system", "Answer briefly."), ("human", QUESTION)]
    chunks = list(chat.stream(messages, contexts=FILM))
    assert "Answer briefly." in prompts[0] and SYSTEM_PROMPT not in prompts[0]  # the system message replaces it
    assert FILM_TEXT in prompts[0] and QUESTION in prompts[0]
    answer = reader_answer(QUESTION, FILM_PASSAGES, system_prompt="Answer briefly.")
    assert len(chunks) > 1 and "".join(c.content for c in chunks).strip() == answer
    assert chat.invoke(messages, contexts=FILM).content == answer
