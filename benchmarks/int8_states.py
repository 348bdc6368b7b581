"""Copy an index with float16 context states into one with int8 states, without re-encoding anything.

    python benchmarks/int8_states.py indexes/states indexes/states_int8

The states `cepe-rag index --context-states` stores are the encoder's output rounded to float16, and
`--states-format int8` quantises exactly those float16 values; so converting the stored float16 states gives the same
bytes as re-encoding with `--states-format int8`, in seconds instead of minutes. Prints both sizes; then compare the
answers of `cepe-rag eval --readers cepe` on the two indexes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
from pathlib import Path

from cepe_rag.indexes.passage_db import STATES_FORMAT_KEY, pack_int8, unpack_float16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.target.exists():
        raise SystemExit(f"{args.target} exists: choose a new folder")
    hidden = json.loads((args.source / "manifest.json").read_text())["dimension"]  # MiniLM: encoder = embedder width
    shutil.copytree(args.source, args.target)
    with sqlite3.connect(args.target / "passages.sqlite") as db:
        format_row = db.execute("SELECT value FROM meta WHERE key = ?", (STATES_FORMAT_KEY,)).fetchone()
        if format_row and format_row[0] != "float16":
            raise SystemExit(f"{args.source} stores {format_row[0]} states, not float16")
        before = db.execute("SELECT SUM(LENGTH(states)), COUNT(*) FROM context_states").fetchone()
        rows = db.execute("SELECT passage_id, tokens, states FROM context_states").fetchall()
        db.executemany("UPDATE context_states SET states = ? WHERE passage_id = ?",
                       [(pack_int8(unpack_float16(blob, tokens, hidden)), pid) for pid, tokens, blob in rows])
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, 'int8')", (STATES_FORMAT_KEY,))
        after = db.execute("SELECT SUM(LENGTH(states)) FROM context_states").fetchone()[0]
    db.close()
    vacuum = sqlite3.connect(args.target / "passages.sqlite")
    vacuum.execute("VACUUM")
    vacuum.close()
    print(json.dumps({"passages": before[1], "float16_bytes": before[0], "int8_bytes": after,
                      "bytes_per_passage": {"float16": before[0] / before[1], "int8": after / before[1]},
                      "folder_mib": {"float16": _mib(args.source), "int8": _mib(args.target)}}, indent=2))


def _mib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)


if __name__ == "__main__":
    main()
