"""The official langchain-tests suites, offline, on the packaged default models."""

import functools
import tempfile
from pathlib import Path

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from cepe_rag.integrations.langchain import CepeRetriever, ChatCepe

pytestmark = pytest.mark.real_models


@functools.cache
def small_index() -> str:
    from cepe_rag.pipelines.indexing import build_index

    folder = Path(tempfile.mkdtemp(prefix="cepe-lc-"))
    (folder / "corpus").mkdir()
    facts = ["Stanley Kubrick directed 2001: A Space Odyssey.", "Paris is the capital of France.",
             "Otters are semiaquatic mammals.", "The Nile flows north.", "Rome was founded in 753 BC."]
    for i, fact in enumerate(facts):
        (folder / "corpus" / f"{i}.txt").write_text(fact)
    build_index([folder / "corpus"], folder / "index")
    return str(folder / "index")


class TestChatCepeUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatCepe


class TestChatCepeIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatCepe

    @property
    def chat_model_params(self):
        return {"max_tokens": 16}

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def returns_usage_metadata(self):
        return False

    @property
    def supports_model_override(self):
        return False


class TestCepeRetrieverIntegration(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return CepeRetriever

    @property
    def retriever_constructor_params(self):
        return {"index": small_index(), "k": 3}

    @property
    def retriever_query_example(self):
        return "Who directed 2001?"
