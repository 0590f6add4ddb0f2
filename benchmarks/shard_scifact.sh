#!/bin/bash
# Sharded corpus encoding of SciFact against a single run (issue 18):
#   benchmarks/shard_scifact.sh EFFIR MODEL DATA OUT
# 1. `effir eval` alone (no cache);
# 2. `effir encode --shard I/3` as three local processes at once; shard 0
#    (blocks 0 and 3) is killed once its first block is on disk and run
#    again, resuming;
# 3. `effir eval --embeddings` over the three shards.
# Prints whether metrics.json and run.trec are the same bytes, and times.
set -euo pipefail
EFFIR=${1:?effir binary}; MODEL=${2:?model}; DATA=${3:?data}; OUT=${4:?output dir}
rm -rf "$OUT"; mkdir -p "$OUT"
t0=$(date +%s.%N)
"$EFFIR" eval --quiet --no-cache --model "$MODEL" --data "$DATA" --out "$OUT/single" > "$OUT/single.log"
t1=$(date +%s.%N)
pids=()
for i in 0 1 2; do
  "$EFFIR" encode --quiet --model "$MODEL" --data "$DATA" --shard "$i/3" --out "$OUT/shard-$i" > "$OUT/shard-$i.log" 2>&1 &
  pids+=($!)
done
while kill -0 "${pids[0]}" 2>/dev/null && [ ! -f "$OUT/shard-0.partial/block-000000.npy" ]; do sleep 0.05; done
if kill "${pids[0]}" 2>/dev/null; then
  wait "${pids[0]}" || true
  echo "shard 0 killed with $(ls "$OUT/shard-0.partial" | grep -c block-) finished block(s) on disk; run again:"
  "$EFFIR" encode --quiet --model "$MODEL" --data "$DATA" --shard 0/3 --out "$OUT/shard-0" > "$OUT/shard-0-resumed.log" 2>&1
  cat "$OUT/shard-0-resumed.log"
else
  echo "shard 0 finished before it could be killed"
fi
wait "${pids[1]}" "${pids[2]}"
t2=$(date +%s.%N)
"$EFFIR" eval --quiet --no-cache --model "$MODEL" --data "$DATA" --out "$OUT/merged" \
  --embeddings "$OUT/shard-0" --embeddings "$OUT/shard-1" --embeddings "$OUT/shard-2" > "$OUT/merged.log"
t3=$(date +%s.%N)
for f in metrics.json run.trec; do
  if cmp -s "$OUT/single/$f" "$OUT/merged/$f"; then echo "$f: identical bytes"; else echo "$f: DIFFERS"; exit 1; fi
done
printf 'single eval %.0f s; three shards (2 cores shared, one killed and resumed) %.0f s; merge and score %.0f s\n' \
  "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$(echo "$t3 - $t2" | bc)"
grep -h "nDCG@10\|ndcg@10" "$OUT/single.log" "$OUT/merged.log" || true
