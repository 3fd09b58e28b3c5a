#!/usr/bin/env bash
# Paired, alternating: baton up --prefill 2 --decode 2, warm, chat; decode workers at nice A then B.
set -e
cd /work/main
model=$(scripts/fetch-model.sh); base=$1; shift
for nice in "$@"; do HANDOFF=${HANDOFF:-push}
  out=$base/$HANDOFF-nice$nice-$(date +%H%M%S); mkdir -p $out
  ./target/release/baton up --model $model --http 127.0.0.1:18081 --grpc 127.0.0.1:18052 --prefill 1 --decode 1 --decode-nice $nice --handoff $HANDOFF > $out/up.log 2>&1 & upid=$!
  for i in $(seq 1 300); do curl -sf http://127.0.0.1:18081/ready >/dev/null && break; sleep 0.2; done
  ./target/release/baton bench serve --endpoint http://127.0.0.1:18081 --concurrency 4 --seed 7 --tokenizer $model --no-progress --ignore-eos --num-requests 16 --shared-prefix-len 1024 --input-len 64 --output-len 32 --out $out/warmup > /dev/null
  ./target/release/baton bench serve --endpoint http://127.0.0.1:18081 --rate 0.5 --seed 7 --tokenizer $model --no-progress --ignore-eos --slo ttft=1s,tpot=100ms --conversations 8 --turns 4 --shared-prefix-len 512 --input-len 48 --output-len 48 --think-time 1s --out $out/chat > $out/chat.txt 2>&1
  echo "$HANDOFF nice $nice: $(grep -E 'TTFT p50|TTFT p99|TPOT p50|goodput' $out/chat.txt | tr -s ' ' | tr '\n' ';')"
  kill -TERM $upid; wait $upid || true
done
