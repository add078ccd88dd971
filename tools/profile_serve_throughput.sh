#!/usr/bin/env bash
# Where a CPU server's time goes under concurrency (issue 17): the serve bench's throughput phase (16 closed-loop
# single-image clients, uniform over the tasks) with the care-serve server sampled by py-spy meanwhile, then the
# samples summed by thread and activity (tools/summarize_pyspy.py).
#
#   bash tools/profile_serve_throughput.sh /tmp/throughput-profile      # TASKS=300 by default; about 5 minutes
set -eu
OUT=${1:-/tmp/throughput-profile}
TASKS=${TASKS:-300}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
"$BIN/care-bench" serve --tasks "$TASKS" --concurrency 16 --caps "" --publishes 0 --duration 15 --warmup 5 \
    --throughput-duration 40 --reference-repeats 1 --out "$OUT" >"$OUT/bench.log" 2>&1 &
bench=$!
# The throughput phase starts right after the offline backbone's throughput is logged; its window after the warm-up.
until grep -q "backbone alone, images/s by batch size" "$OUT/bench.log"; do
    kill -0 "$bench" 2>/dev/null || { tail -20 "$OUT/bench.log"; exit 1; }
    sleep 1
done
sleep 6
server=$(pgrep -f -- "care-serve serve --no-worker" | head -1)
"$BIN/py-spy" record -p "$server" --duration 25 --rate 100 --format raw --threads -o "$OUT/profile.txt"
wait "$bench"
grep -E "T=$TASKS|images/s" "$OUT/bench.log" | tail -5
"$BIN/python" tools/summarize_pyspy.py "$OUT/profile.txt" | tee "$OUT/summary.md"
