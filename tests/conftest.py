import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):
    """The kernels and default dtype this run computes with (`make test-isa` caps them; docs/tests.md)."""
    import torch

    from cepe_rag.models import resolve_dtype

    return (f"cpu kernels: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN up to "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'the CPU')}; default dtype {resolve_dtype(None, 'cpu')}")


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
