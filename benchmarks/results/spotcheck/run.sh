#!/bin/bash
# Issue 15 spot-check: re-run the first questions of README rows and compare predictions word for word.
set -x
export OMP_NUM_THREADS=1
C=.venv/bin/cepe-rag
$C eval --questions runs/owndocs/questions.test.jsonl --index indexes/owndocs --readers concat --k 20 --dtype bfloat16 \
   --prompt instruction --max-new-tokens 25 --limit 40 --retrieval hybrid --out runs/spot_owndocs
$C eval --questions ../shared/data/nq_open/NQ-open.dev.jsonl --index indexes/default --answer-in-corpus --readers cepe \
   --k 5 --dtype bfloat16 --limit 100 --retrieval dense --out runs/spot_nq_cepe
.venv/bin/python benchmarks/retrieval_recall.py --questions ../shared/data/nq_open/NQ-open.dev.jsonl --index indexes/default --answer-in-corpus --limit 500 --out runs/spot_recall
