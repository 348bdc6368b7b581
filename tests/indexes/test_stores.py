"""Both passage stores answer what the retriever, the indexer and `cepe-rag docs` ask (indexes/stores.py)."""

import inspect

import pytest

from cepe_rag.indexes.stores import PassageStore

pytest.importorskip("qdrant_client")
from cepe_rag.indexes import IndexStore, QdrantStore  # noqa: E402

PROTOCOL_METHODS = [name for name, member in vars(PassageStore).items()
                    if callable(member) and not name.startswith("_")]


@pytest.mark.parametrize("store_class", [IndexStore, QdrantStore])
def test_each_store_has_the_protocols_methods_with_its_parameters(store_class):
    assert len(PROTOCOL_METHODS) >= 15
    for name in PROTOCOL_METHODS:
        wanted = list(inspect.signature(getattr(PassageStore, name)).parameters)
        assert list(inspect.signature(getattr(store_class, name)).parameters) == wanted, name


def test_an_opened_index_is_a_passage_store(tmp_path):
    from cepe_rag.indexes import Manifest, open_store

    store = IndexStore.create_or_open(tmp_path / "idx", Manifest(embedder="test", dimension=4))
    store.close()
    opened = open_store(tmp_path / "idx")
    assert isinstance(opened, PassageStore)
    opened.close()
