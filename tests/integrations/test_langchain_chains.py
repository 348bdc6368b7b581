"""LCEL composition with the LangChain adapters, on the packaged default models."""

import pytest
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.vectorstores import InMemoryVectorStore

from cepe_rag.integrations.langchain import CepeLLM, CepeRetriever, ChatCepe, rag_chain
from tests.integrations.test_langchain_standard import small_index

pytestmark = pytest.mark.real_models

# The 135M decoder does not reliably copy an arbitrary code from a passage (tried: it invents one), so content
# checks use a fact it does read correctly; that passages reach the reader is checked from its usage counts.
FILM = [Document(page_content="2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.",
                 metadata={"title": "2001: A Space Odyssey"})]
QUESTION = "Who directed 2001: A Space Odyssey?"


@pytest.fixture(scope="module")
def llm():
    return CepeLLM(max_tokens=16)


def test_contexts_reach_the_reader_not_the_prompt(llm):
    result = llm.generate([QUESTION], contexts=FILM)
    generation = result.generations[0][0]
    assert "Kubrick" in generation.text
    assert generation.generation_info["passages_read"] == 1
    closed = llm.generate([QUESTION])  # no contexts, no retriever: nothing read
    assert closed.generations[0][0].generation_info["passages_read"] == 0


def test_lcel_prompt_llm_parser_with_bound_contexts(llm):
    chain = PromptTemplate.from_template("Who directed {film}?") | llm.bind(contexts=FILM) | StrOutputParser()
    assert "Kubrick" in chain.invoke({"film": "2001: A Space Odyssey"})
    answers = chain.batch([{"film": "2001: A Space Odyssey"}, {"film": "the 1968 film 2001"}])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    chunks = list(chain.stream({"film": "2001: A Space Odyssey"}))
    assert len(chunks) > 1 and "Kubrick" in "".join(chunks)


async def test_astream_and_ainvoke(llm):
    chunks = [chunk async for chunk in llm.astream(QUESTION, contexts=FILM)]
    assert len(chunks) > 1 and "Kubrick" in "".join(chunks)
    assert "Kubrick" in await llm.ainvoke(QUESTION, contexts=FILM)


def test_llm_retrieves_for_itself_when_given_a_retriever():
    llm = CepeLLM.from_index(small_index(), k=1, max_tokens=16)
    result = llm.generate(["Who directed 2001: A Space Odyssey?"])
    assert "Kubrick" in result.generations[0][0].text
    assert result.generations[0][0].generation_info["passages_read"] == 1


def test_rag_chain_returns_answer_and_sources():
    chain = rag_chain(CepeRetriever(index=small_index(), k=1), CepeLLM(max_tokens=16))
    output = chain.invoke("Who directed 2001: A Space Odyssey?")
    assert "Kubrick" in output["answer"]
    assert output["source_documents"][0].metadata["source"].endswith("0.txt")
    assert output["source_documents"][0].metadata["score"] > 0


def test_any_vector_store_retriever_is_a_passage_source():
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
    assert "Kubrick" in llm.invoke("Who directed 2001: A Space Odyssey?")


def test_chat_model_streams_chunks_with_contexts():
    chat = ChatCepe(max_tokens=16)
    chunks = list(chat.stream([("system", "Answer briefly."), ("human", QUESTION)],
                              contexts=FILM))
    assert len(chunks) > 1 and "Kubrick" in "".join(c.content for c in chunks)
