"""The own-documents benchmark generator: deterministic, answerable only from its files, splits disjoint."""

import json

from cepe_rag.eval.owndocs import _base, generate, write_benchmark


def read_split(folder, name):
    return [json.loads(line) for line in (folder / f"questions.{name}.jsonl").read_text().splitlines()]


def test_the_same_seed_writes_the_same_benchmark(tmp_path):
    first = write_benchmark(tmp_path / "a")
    second = write_benchmark(tmp_path / "b")
    assert first == second and first["test"] >= 300 and first["namesakes"] > 20
    for name in ("questions.test.jsonl", "questions.tune.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    files = sorted(p.name for p in (tmp_path / "a" / "corpus").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b" / "corpus").iterdir())
    assert all((tmp_path / "a" / "corpus" / f).read_text() == (tmp_path / "b" / "corpus" / f).read_text()
               for f in files)


def test_every_answer_is_in_its_own_file_and_the_splits_share_no_name(tmp_path):
    write_benchmark(tmp_path)
    test, tune = read_split(tmp_path, "test"), read_split(tmp_path, "tune")
    assert len(tune) == 100
    for record in test + tune:
        text = (tmp_path / "corpus" / record["source"]).read_text()
        assert text.startswith(f"# {record['entity']}\n") and record["answer"][0] in text
        assert set(record) >= {"question", "answer"}  # NQ-open format
    assert not {_base(r["entity"]) for r in test} & {_base(r["entity"]) for r in tune}


def test_near_namesakes_carry_other_facts_and_forbidden_words_are_never_names():
    first_name = generate(n_groups=1, seed=3)[0].name.split()[0]  # the name seed 3 draws first
    entities = generate(n_groups=40, seed=3, forbidden=[first_name])
    bases = {}
    for entity in entities:
        bases.setdefault(_base(entity.name), []).append(entity)
    pairs = [group for group in bases.values() if len(group) > 1]
    assert pairs and all(a.text != b.text and a.name != b.name for a, b in pairs)
    assert not any(first_name in e.name.split() for e in entities)
