"""Token-aware splitting into passages (langchain-text-splitters, measured with the embedder's tokenizer)."""

from __future__ import annotations

from langchain_text_splitters import RecursiveCharacterTextSplitter

from cepe_rag.settings import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS


class PassageSplitter:
    def __init__(self, tokenizer, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 overlap_tokens: int = DEFAULT_OVERLAP_TOKENS):
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = min(overlap_tokens, chunk_tokens // 2)
        self._splitter = RecursiveCharacterTextSplitter(
            chunk_size=chunk_tokens,
            chunk_overlap=self.overlap_tokens,
            length_function=self.count_tokens,
            separators=["\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", ""],
            keep_separator="end",
        )
        self.max_chars = chunk_tokens * 16
        self._char_splitter = RecursiveCharacterTextSplitter(chunk_size=self.max_chars, chunk_overlap=0)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def split(self, text: str) -> list[str]:
        # Most corpus documents (e.g. Wikipedia summaries) fit in one passage: skip the splitter's merge loop.
        if len(text) <= self.max_chars and self.count_tokens(text) <= self.chunk_tokens:
            return [text]
        chunks = []
        for chunk in self._splitter.split_text(text):
            # WordPiece maps a very long unbroken string to one [UNK]: bound passages in characters too.
            chunks.extend(self._char_splitter.split_text(chunk) if len(chunk) > self.max_chars else [chunk])
        return [chunk.strip() for chunk in chunks if chunk.strip()]
