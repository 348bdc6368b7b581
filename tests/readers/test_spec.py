"""One constructor for readers: every entry point builds them from a ReaderSpec."""

import pytest

from cepe_rag.readers import ClosedBookReader, ConcatReader, ParallelReader, build_reader
from cepe_rag.settings import APE_SCALE, DEFAULT_READER, ReaderSpec
from cepe_rag.types import CepeRagError


def test_the_default_reader_is_one_of_the_readers():
    from cepe_rag.readers import READERS

    assert DEFAULT_READER in READERS


def test_labels_and_recorded_settings():
    assert ReaderSpec().label == DEFAULT_READER
    assert ReaderSpec(reader="cepe", n_prompt_passages=10).label == "cepe-prompt10"
    assert ReaderSpec(reader="cepe", n_prompt_passages=1, relevance_temperature=0.05).label == "cepe-prompt1-rel0.05"
    assert ReaderSpec(reader="parallel").settings()["ape_scale"] == APE_SCALE
    assert "most_relevant" not in ReaderSpec(reader="concat").settings()
    assert ReaderSpec(reader="concat", most_relevant="last").settings()["most_relevant"] == "last"
    with pytest.raises(CepeRagError, match="needs a CEPE checkpoint"):
        ReaderSpec(reader="cepe", decoder="some/other-decoder").checkpoint()


@pytest.mark.real_models
def test_build_reader_shares_one_loaded_decoder():
    readers = [build_reader(ReaderSpec(reader=name, prompt_style="fewshot"))
               for name in ("concat", "parallel", "closed-book")]
    assert [type(r) for r in readers] == [ConcatReader, ParallelReader, ClosedBookReader]
    assert readers[0].model is readers[1].model is readers[2].model
    assert all(r.prompt_style == "fewshot" for r in readers)
    assert readers[1].ape_scale == APE_SCALE
