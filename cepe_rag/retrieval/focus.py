"""Sentence focus: each passage a reader reads starts with its sentence most relevant to the question.

The 135M decoder answers from the first sentence it reads: asked who designed a bridge, it copies a passage's
opening sentence ("The Quorvath Bridge is a stone footbridge ...") when the designer is named in the second.
Sentence focus repeats the passage's most relevant sentence ahead of it ("It was designed by the engineer Mirela
Stanchev and opened in 1887. The Quorvath Bridge is ..."): nothing is dropped or reordered, so the prose keeps its
sense (moving the sentence instead, or reordering them all, lost more answers than it gained: docs/retrieval.md,
"Sentence focus"). Sentences are scored as LlamaIndex's SentenceEmbeddingOptimizer and RECOMP's extractive compressor
(Xu et al., 2023) score them, by the retrieval embedder's cosine to the question, but with the passage title's words
taken out of both: otherwise the sentence that names the subject wins whatever the question asks about it.
Sentence boundaries come from pysbd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from cepe_rag.documents.sentences import sentences, without_title
from cepe_rag.models import embed_texts
from cepe_rag.types import Passage


def focus_passages(question: str, passages: Sequence[Passage], embedder) -> list[Passage]:
    """The passages with `focused_text` set: the sentence most similar to the question, then the whole text as it
    is. A passage of one sentence, or whose first sentence is already the most similar, is left as it is."""
    split = [sentences(p.text) for p in passages]
    multi = [i for i, parts in enumerate(split) if len(parts) > 1]
    if not multi:
        return list(passages)
    texts = []
    for i in multi:
        texts += [without_title(question, passages[i].title)] + [without_title(s, passages[i].title) for s in split[i]]
    vectors = iter(np.asarray(embed_texts(embedder, texts), dtype=np.float32))
    focused = list(passages)
    for i in multi:
        query = next(vectors)
        scores = [float(next(vectors) @ query) for _ in split[i]]
        best = max(range(len(scores)), key=scores.__getitem__)  # the first of equals
        if best:
            focused[i] = replace(passages[i], focused_text=f"{split[i][best]} {passages[i].text}")
    return focused
