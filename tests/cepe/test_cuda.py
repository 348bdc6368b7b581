"""CUDA paths (run by benchmarks/gpu_check.sh on a GPU machine; skipped without one)."""

import pytest
import torch

from tests.cepe.test_modeling import random_chunks, tiny_cepe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cepe_on_the_gpu_matches_the_cpu():
    model = tiny_cepe()
    ids = torch.randint(0, 120, (2, 9))
    chunks = [random_chunks([5, 3]), random_chunks([4], seed=3)]
    expected = model(input_ids=ids, cross_context=model.context_from_states(chunks)).logits
    gpu = model.to("cuda")
    found = gpu(input_ids=ids.cuda(), cross_context=gpu.context_from_states(chunks)).logits
    assert torch.allclose(found.cpu(), expected, atol=1e-8)  # float64 on both: agreement to rounding


def test_cached_and_absorbed_cross_kv_agree_on_the_gpu():
    model = tiny_cepe().to("cuda").float()
    ids = torch.randint(0, 120, (1, 7), device="cuda")
    chunks = [[c.float() for c in random_chunks([6, 2])]]
    cached = model(input_ids=ids, cross_context=model.context_from_states(chunks, cross_kv="cache")).logits
    absorbed = model(input_ids=ids, cross_context=model.context_from_states(chunks, cross_kv="absorb")).logits
    assert torch.allclose(cached, absorbed, atol=1e-5)  # float32 and reassociated projections: equal to rounding


def test_faiss_gpu_search_when_installed():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss-gpu not installed")
    import numpy as np

    vectors = np.random.default_rng(0).random((100, 16), dtype=np.float32)
    cpu = faiss.IndexFlatIP(16)
    cpu.add(vectors)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    assert (gpu.search(vectors[:5], 3)[1] == cpu.search(vectors[:5], 3)[1]).all()
