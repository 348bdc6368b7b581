#!/bin/bash
# ask start-up, before (e447653, checked out in /work/wt-e447: git worktree add ../wt-e447 e447653) and now, alternating; OMP_NUM_THREADS=1 as in the earlier measurement (docs/cli.md, "ask").
Q="Who directed 2001: A Space Odyssey?"
export OMP_NUM_THREADS=1
for i in 1 2 3; do
  (cd /work/wt-e447 && PYTHONPATH=/work/wt-e447 /usr/bin/time -f "before %e s" /work/main/.venv/bin/python -m cepe_rag ask "$Q" --index /work/main/indexes/default --k 5 --reader concat --json 2>&1 >/dev/null | grep -E '^before|rror')
  /usr/bin/time -f "now %e s" .venv/bin/python -m cepe_rag ask "$Q" --index indexes/default --k 5 --reader concat --json 2>&1 >/tmp/ask_now.json | grep -E '^now|rror'
  /usr/bin/time -f "now-float32 %e s" .venv/bin/python -m cepe_rag ask "$Q" --index indexes/default --k 5 --reader concat --json --dtype float32 2>&1 >/dev/null | grep -E '^now|rror'
done
python3 -c "import json; d=json.load(open('/tmp/ask_now.json')); print(d['text'] if 'text' in d else d.get('answer'), d.get('timings'))"
