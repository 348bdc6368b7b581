"""QA datasets through `datasets`: FlashRAG JSONL, NQ-open JSONL, or hub names when online."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cepe_rag.types import CepeRagError


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]


def load_questions(source: str, *, split: str = "train", limit: int = 0) -> list[QAExample]:
    """{id, question, golden_answers} (FlashRAG) or {question, answer} (NQ-open) records."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if Path(source).exists():
            dataset = datasets.load_dataset("json", data_files=str(source), split="train")
        else:
            dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many types; one line for the user
        raise CepeRagError(f"cannot load questions from {source!r}: {str(error).splitlines()[0]}") from None
    examples = []
    for index, record in enumerate(dataset):
        answers = record.get("golden_answers") or record.get("answer") or record.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not record.get("question") or not answers:
            raise CepeRagError(f"{source}: record {index} has no question or answers "
                               "(expected FlashRAG {id, question, golden_answers} or NQ-open {question, answer})")
        examples.append(QAExample(str(record.get("id", index)), record["question"], list(answers)))
        if limit and len(examples) >= limit:
            break
    return examples
