import json
import os

import pytest

from cepe_rag.documents import LoadReport, PassageSplitter, iter_documents
from cepe_rag.types import CepeRagError


def assert_warned(report, fragments):
    warnings = "\n".join(report.skipped)
    for fragment in fragments:
        assert fragment in warnings, warnings


def load(*sources, **kwargs):
    report = LoadReport()
    return list(iter_documents(list(sources), report, **kwargs)), report


def test_reads_text_markdown_html_jsonl_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text about otters.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Heading\n\nMarkdown about beavers.")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Kubrick</title><style>p{}</style></head>"
        "<body><p>Directed <b>2001</b>.</p><script>var x = 1;</script></body></html>")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": "7", "contents": "Title Seven\nBody seven."}) + "\n"
        + json.dumps({"title": "T8", "text": "Body eight."}) + "\n")
    (tmp_path / "e.json").write_text(json.dumps({"Otter": {"title": "Otter", "extract": "Otters swim."}}))
    (tmp_path / "f.md").write_text("Markdown with no heading first.\n\n# Later heading\n")
    docs, report = load(tmp_path)
    by_title = {d.title: d for d in docs}
    assert set(by_title) == {"a", "Heading", "f", "Kubrick", "Title Seven", "T8", "Otter"}
    assert by_title["Heading"].text == "Markdown about beavers."  # the heading is the title, not repeated
    assert by_title["Kubrick"].text == "Directed\n2001\n."
    assert "var x" not in by_title["Kubrick"].text
    assert by_title["Title Seven"].text == "Body seven."
    assert by_title["Title Seven"].key.endswith("d.jsonl#7")
    assert by_title["Otter"].text == "Otters swim."
    assert report.skipped == []


def test_pdf_is_parsed(tmp_path):
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    writer.add_metadata({"/Title": "Empty"})
    with open(tmp_path / "blank.pdf", "wb") as handle:
        writer.write(handle)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    docs, report = load(tmp_path)
    assert docs == []
    assert any("blank.pdf: no text" in w for w in report.skipped)
    assert any("broken.pdf" in w and "PDF" in w for w in report.skipped)


def test_bad_files_are_skipped_with_warnings(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "bad.jsonl").write_text('{"title": "ok", "text": "one"}\n{not json\n{"foo": 1}\n')
    (tmp_path / "bad.json").write_text("{ nope")
    docs, report = load(tmp_path)
    assert sorted(d.text for d in docs) == ["fine", "one"]
    assert_warned(report, ["binary.txt: binary file", "latin1.txt: not UTF-8", "image.png: unsupported",
                           "bad.jsonl:2: malformed JSON", "bad.jsonl:3: no 'contents'", "bad.json: malformed JSON"])


def test_dangling_symlink_is_skipped_as_unreadable(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    docs, report = load(tmp_path)
    assert [d.text for d in docs] == ["fine"]
    assert len(report.skipped) == 1 and "dangling.txt" in report.skipped[0]


def test_unreadable_file_is_skipped(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    (tmp_path / "secret.txt").write_text("x")
    (tmp_path / "secret.txt").chmod(0)
    docs, report = load(tmp_path)
    assert docs == [] and "secret.txt" in report.skipped[0]


def test_huge_single_line_file_is_skipped_quickly(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "w") as handle:
        handle.write("word " * (10 * 2**20))  # 50 MB, one line
    (tmp_path / "small.txt").write_text("small")
    docs, report = load(tmp_path, max_document_mb=10)
    assert [d.text for d in docs] == ["small"]
    assert "big.txt: 50.0 MB is over the document size limit" in report.skipped[0]


def test_symlink_loop_terminates(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "doc.txt").write_text("inside")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    docs, report = load(tmp_path)
    assert [d.text for d in docs] == ["inside"]
    assert any("symlink loop" in w for w in report.skipped)


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(CepeRagError, match="source not found"):
        load(tmp_path / "nope")


def test_splitter_respects_token_budget(embedder):
    splitter = PassageSplitter(embedder.tokenizer, chunk_tokens=64, overlap_tokens=8)
    text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(200))
    chunks = splitter.split(text)
    assert len(chunks) > 10
    assert max(splitter.count_tokens(c) for c in chunks) <= 64
    assert splitter.split("short text") == ["short text"]
    # A giant unbroken string is one WordPiece [UNK]; it must still be cut into bounded passages.
    assert max(len(c) for c in splitter.split("x" * 100_000)) <= 64 * 16


WORD = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def write_docx(path, paragraphs, *, header=None):
    """A minimal real .docx: a Zip with word/document.xml (and a page header), what Word's own files hold."""
    import zipfile

    def part(root, body):
        return f'<?xml version="1.0" encoding="UTF-8"?><w:{root} xmlns:w="{WORD}">{body}</w:{root}>'

    runs = "".join(f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>" for text in paragraphs)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", part("document", f"<w:body>{runs}</w:body>"))
        if header:
            archive.writestr("word/header1.xml", part("hdr", f"<w:p><w:r><w:t>{header}</w:t></w:r></w:p>"))


def test_docx_title_is_its_first_paragraph_and_headers_are_left_out(tmp_path):
    write_docx(tmp_path / "report.docx", ["Quarterly Report", "Revenue grew by 12 percent.", "Costs fell."],
               header="CONFIDENTIAL")
    write_docx(tmp_path / "memo.docx", ["A single paragraph is the text, and the file name the title."])
    long_opening = "This opening paragraph is prose rather than a heading. " * 5
    write_docx(tmp_path / "essay.docx", [long_opening, "Second paragraph."])
    docs, report = load(tmp_path)
    by_key = {os.path.basename(d.key): d for d in docs}
    assert (by_key["report.docx"].title, by_key["report.docx"].text) == (
        "Quarterly Report", "Revenue grew by 12 percent.\n\nCosts fell.")  # the title is not repeated
    assert "CONFIDENTIAL" not in by_key["report.docx"].text
    assert by_key["memo.docx"].title == "memo" and by_key["memo.docx"].text.startswith("A single paragraph")
    assert by_key["essay.docx"].title == "essay" and by_key["essay.docx"].text.startswith(long_opening.strip())
    assert report.skipped == []


def test_corrupt_docx_files_are_skipped_with_one_warning_each(tmp_path):
    import zipfile

    (tmp_path / "not-a-zip.docx").write_text("this is not a zip archive")
    with zipfile.ZipFile(tmp_path / "no-body.docx", "w") as archive:
        archive.writestr("word/styles.xml", "<styles/>")
    with zipfile.ZipFile(tmp_path / "bad-xml.docx", "w") as archive:
        archive.writestr("word/document.xml", "<w:document><w:body>unclosed")
    write_docx(tmp_path / "empty.docx", [])
    write_docx(tmp_path / "good.docx", ["Title", "Body."])
    docs, report = load(tmp_path)
    assert [d.title for d in docs] == ["Title"]
    warnings = "\n".join(report.skipped)
    assert len(report.skipped) == 4 and "Traceback" not in warnings
    assert "not-a-zip.docx: not a .docx file (not a Zip archive), skipped" in warnings
    assert "no-body.docx: not a .docx file (no word/document.xml), skipped" in warnings
    assert "bad-xml.docx: unreadable .docx (malformed document XML" in warnings
    assert "empty.docx: no text, skipped" in warnings


def test_docx_whose_document_xml_is_too_large_is_not_parsed(tmp_path):
    write_docx(tmp_path / "big.docx", ["Heading", "word " * 20_000])  # ~100 kB of XML that compresses to little
    docs, report = load(tmp_path, max_document_mb=0.001)  # 1 kB of text at most: 16 kB of XML
    assert docs == []
    assert "big.docx: 0.1 MB of document XML is over the document size limit" in report.skipped[0]


def test_csv_rows_become_lines_with_their_column_names(tmp_path):
    (tmp_path / "people.csv").write_text(
        'name,born,notes\nAda Lovelace,1815,"wrote the first program,\nfor the Analytical Engine"\n'
        "Alan Turing,1912,\n\n,,\nGrace Hopper,1906,admiral,extra\n")
    (tmp_path / "cities.csv").write_text('city;country\nParis;France\n"Rome; the eternal city";Italy\n')
    (tmp_path / "quotes.csv").write_text('who,said\nAda,"she said ""hi"""\n')
    (tmp_path / "single.csv").write_text("word\nalpha\nbeta\n")
    docs, report = load(tmp_path)
    by_title = {d.title: d.text for d in docs}
    assert by_title["people"] == (
        "name: Ada Lovelace; born: 1815; notes: wrote the first program, for the Analytical Engine\n"
        "name: Alan Turing; born: 1912\n"  # empty cells and empty rows are left out
        "name: Grace Hopper; born: 1906; notes: admiral; column 4: extra")
    assert by_title["cities"] == "city: Paris; country: France\ncity: Rome; the eternal city; country: Italy"
    assert by_title["quotes"] == 'who: Ada; said: she said "hi"'
    assert by_title["single"] == "word: alpha\nword: beta"
    assert report.skipped == []


def test_bad_csv_files_are_skipped_with_one_warning_each(tmp_path):
    (tmp_path / "good.csv").write_text("a,b\n1,2\n")
    (tmp_path / "quoting.csv").write_text('a,b\n1,2\n"x"y,z\n')
    (tmp_path / "latin1.csv").write_bytes("name,city\nJos\xe9,C\xe1diz\n".encode("latin-1"))
    (tmp_path / "binary.csv").write_bytes(b"a,b\n\x00\x01,2\n")
    (tmp_path / "header-only.csv").write_text("a,b,c\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "huge.csv").write_text("name,value\n" + "".join(f"row{i},{i}\n" for i in range(200)))
    docs, report = load(tmp_path, max_document_mb=0.001)
    assert [d.text for d in docs] == ["a: 1; b: 2"]
    assert len(report.skipped) == 6, report.skipped
    assert_warned(report, ["quoting.csv:3: malformed CSV (',' expected after '\"'), skipped", "latin1.csv: not UTF-8",
                           "binary.csv: binary file", "header-only.csv: no rows under the header, skipped",
                           "empty.csv: no text, skipped",
                           "huge.csv: the rows up to line 48 are already over the document size limit"])


def make_tree(root, files):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content) if isinstance(content, bytes) else (root / name).write_text(content)


def test_include_and_exclude_choose_files_by_their_path_in_the_folder(tmp_path):
    make_tree(tmp_path, {"a.md": "top", "notes/b.md": "note", "notes/c.txt": "text note", "drafts/d.md": "draft",
                         "drafts/deep/e.md": "deeper draft", "notes/drafts/f.md": "a nested drafts folder",
                         "photo.png": b"\x89PNG", "drafts/bad.txt": b"\x00binary"})
    docs, report = load(tmp_path, include=["*.md"], exclude=["drafts/**"])
    assert sorted(d.text for d in docs) == ["a nested drafts folder", "note", "top"]  # drafts/** is anchored
    assert report.skipped == []  # filtered-out files are neither read nor reported (photo.png, drafts/bad.txt)
    docs, _ = load(tmp_path, exclude=["drafts", "*.png", "drafts/bad.txt"])  # a bare name: at any depth
    assert sorted(d.text for d in docs) == ["note", "text note", "top"]
    docs, _ = load(tmp_path, include=["notes/**", "/a.md"], exclude=["**/f.md"])
    assert sorted(d.text for d in docs) == ["note", "text note", "top"]


def test_excluded_folders_are_not_walked(tmp_path):
    make_tree(tmp_path, {"keep.txt": "kept", "node_modules/x/y.txt": "dependency"})
    os.symlink(tmp_path, tmp_path / "node_modules" / "x" / "loop")
    docs, report = load(tmp_path, exclude=["node_modules/"])
    assert [d.text for d in docs] == ["kept"] and report.skipped == []  # no symlink-loop warning from inside


def test_a_file_named_as_a_source_is_read_whatever_the_filters(tmp_path):
    make_tree(tmp_path, {"chosen.txt": "named on the command line"})
    docs, _ = load(tmp_path / "chosen.txt", include=["*.md"], exclude=["*.txt"])
    assert [d.text for d in docs] == ["named on the command line"]


@pytest.mark.parametrize("pattern,path,matches", [
    ("*.md", "a.md", True), ("*.md", "x/y/a.md", True), ("*.md", "a.txt", False), ("*.md", "a.md/b.txt", True),
    ("drafts/**", "drafts/a/b.md", True), ("drafts/**", "x/drafts/a.md", False), ("drafts/", "x/drafts/a.md", True),
    ("**/drafts/**", "x/drafts/a.md", True), ("sub/*.md", "sub/a.md", True), ("sub/*.md", "sub/x/a.md", False),
    ("a/**/b.md", "a/b.md", True), ("a/**/b.md", "a/x/y/b.md", True), ("doc?.txt", "doc1.txt", True),
    ("doc?.txt", "doc/.txt", False), ("[!a]*.md", "b.md", True), ("[!a]*.md", "a.md", False),
    ("[^a].md", "^.md", True), ("[^a].md", "b.md", False), ("/top.md", "top.md", True), ("/top.md", "x/top.md", False),
    ("./top.md", "top.md", True), ("a+b (1).md", "a+b (1).md", True), ("a+b (1).md", "aab (1).md", False),
])
def test_glob_patterns(pattern, path, matches):
    from cepe_rag.documents.globs import compile_glob, path_matches

    assert path_matches(compile_glob(pattern), path) is matches


def test_glob_anywhere_matches_the_end_of_absolute_paths():
    from cepe_rag.documents.globs import compile_glob, path_matches

    assert path_matches(compile_glob("corpus/*.txt", anywhere=True), "home/me/corpus/a.txt")
    assert not path_matches(compile_glob("corpus/*.txt", anywhere=True), "home/me/corpus/sub/a.txt")
    assert not path_matches(compile_glob("/corpus/*.txt", anywhere=True), "home/me/corpus/a.txt")


@pytest.mark.parametrize("pattern", ["", "   "])
def test_an_empty_pattern_is_refused(tmp_path, pattern):
    with pytest.raises(CepeRagError, match="empty glob pattern"):
        load(tmp_path, include=[pattern])
