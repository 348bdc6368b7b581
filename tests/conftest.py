import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedder():
    from cepe_rag.models import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The default decoder's real tokenizer (with its chat template); converting the GGUF happens once."""
    from transformers import AutoTokenizer

    from cepe_rag.models import decoder_path

    return AutoTokenizer.from_pretrained(decoder_path())


@pytest.fixture(scope="session")
def real_decoder():
    from cepe_rag.models import load_decoder

    return load_decoder()
