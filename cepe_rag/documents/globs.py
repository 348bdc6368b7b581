"""Glob patterns on '/'-separated paths, the way .gitignore reads them (`index --include/--exclude`, and the
`docs` commands' --source and remove).

`*` and `?` stay inside one path segment, `**` spans any number of folders (none included), and `[...]` is a
character class. A pattern without '/' matches a file or folder name at any depth ('*.md', 'drafts'); one with
'/' is anchored at the start of the path ('drafts/**'), unless it starts with '**/'. A pattern that matches a
folder matches everything under it, so 'drafts', 'drafts/' and 'drafts/**' all mean the whole folder.
fnmatch is not used because its `*` crosses '/': there, 'drafts/*' would also take 'drafts/a/b.md'.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cepe_rag.types import CepeRagError

_GLOB_CHARACTERS = set("*?[")


def is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARACTERS for c in pattern)


def compile_glob(pattern: str, *, anywhere: bool = False) -> re.Pattern[str]:
    """The pattern as a regular expression over whole paths. `anywhere`: also a pattern with '/' may match
    after any '/' (for absolute stored paths, where the user names the tail: 'corpus/drafts/*.md')."""
    if not pattern.strip():
        raise CepeRagError("an empty glob pattern matches nothing: give a pattern such as '*.md' or 'drafts/**'")
    body = pattern.strip().removeprefix("./")
    anchored = body.startswith("/")
    body = body.strip("/") or "**"
    anchored = anchored or ("/" in body and not anywhere)
    if body.endswith("/**"):
        body = body[:-3]  # 'drafts/**' is the folder's content: the same as the folder, which matches it all
    out = [] if anchored else ["(?:.*/)?"]
    i = 0
    while i < len(body):
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        elif body[i] == "[" and (end := body.find("]", i + 2)) != -1:
            inside = body[i + 1:end].replace("\\", "\\\\")
            negate = inside.startswith("!")
            inside = inside[1:] if negate else "\\" + inside if inside.startswith("^") else inside  # '^' is literal
            out.append(f"[{'^' if negate else ''}{inside}]")
            i = end + 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    try:
        return re.compile("".join(out))
    except re.error as error:
        raise CepeRagError(f"invalid glob pattern {pattern!r} ({error})") from None


def path_matches(regex: re.Pattern[str], path: str) -> bool:
    """The path, or one of the folders it is in, matches (a matched folder takes everything under it)."""
    if regex.fullmatch(path):
        return True
    position = path.find("/", 1)
    while position != -1:
        if regex.fullmatch(path, 0, position):
            return True
        position = path.find("/", position + 1)
    return False


class PathFilter:
    """Which files of a source folder are indexed: paths relative to the folder, '/'-separated.

    A file is taken when it matches an --include pattern (or none is given) and no --exclude pattern."""

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()):
        self.include = [compile_glob(p) for p in include]
        self.exclude = [compile_glob(p) for p in exclude]

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def accepts(self, relative: str) -> bool:
        if self.include and not any(path_matches(r, relative) for r in self.include):
            return False
        return not any(path_matches(r, relative) for r in self.exclude)

    def prunes(self, relative_folder: str) -> bool:
        """Nothing under this folder can be taken, so the walk need not enter it (nor warn about its files)."""
        return any(r.fullmatch(relative_folder) for r in self.exclude)
