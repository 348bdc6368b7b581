"""The CEPE adapter shipped for SmolLM2-135M-Instruct, end to end on the real models."""

import pytest

from cepe_rag.cepe import load_cepe
from cepe_rag.readers import GenerationConfig, make_reader
from cepe_rag.settings import packaged_cepe
from cepe_rag.types import Passage

pytestmark = pytest.mark.real_models

PASSAGES = [
    Passage(1, "2001: A Space Odyssey is a 1968 epic science fiction film produced and directed by Stanley Kubrick.",
            title="2001: A Space Odyssey"),
    Passage(2, "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.", title="Eiffel Tower"),
    Passage(3, "The Nile is a major north-flowing river in northeastern Africa.", title="Nile"),
]


def test_the_shipped_adapter_reads_a_fact_from_the_encoder():
    path = packaged_cepe()
    assert path is not None
    model = load_cepe(path)
    assert model.config.num_cross_attn_layers == 8 and model.training_history[-1]["stage"] == "read"
    reader = make_reader("cepe", model, model.decoder_tokenizer, generation=GenerationConfig(max_new_tokens=12))
    question = "When was the Eiffel Tower completed?"
    assert "1889" not in reader.answer(question, []).text  # the frozen decoder alone does not know it
    assert reader.answer(question, PASSAGES).text.strip() == "1889"  # a short answer, read through cross-attention
