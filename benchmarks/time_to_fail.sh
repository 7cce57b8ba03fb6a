#!/bin/bash
# How long `dylora train` takes to give up on a store that cannot work, and to stop on SIGTERM during
# start-up, measured from the command's start (imports included). Run from anywhere, with nothing else
# busy: bash benchmarks/time_to_fail.sh
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
python3 - <<'PY' &
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 47123)); s.listen(64)
held = []
while True:
    c, _ = s.accept(); held.append(c)
PY
SILENT=$!
sleep 1
t0=$(date +%s.%N)
AWS_ENDPOINT_URL=http://127.0.0.1:47123 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x .venv/bin/dylora train --output_dir $OUT --run_id silent --checkpoint_store s3://b/silent --progress false > $OUT/silent.log 2>&1
rc=$?; t1=$(date +%s.%N)
echo "silent endpoint: exit $rc after $(echo "$t1 - $t0" | bc) s"; tail -1 $OUT/silent.log
kill $SILENT
t0=$(date +%s.%N)
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent .venv/bin/dylora train --output_dir $OUT --run_id nocreds --checkpoint_store s3://b/nocreds --progress false > $OUT/nocreds.log 2>&1
rc=$?; t1=$(date +%s.%N)
echo "missing credentials: exit $rc after $(echo "$t1 - $t0" | bc) s"; tail -1 $OUT/nocreds.log
grep -o "checkpoint store .* attempt" $OUT/nocreds.log | head -2
# SIGTERM during start-up: wait for the lock, then signal
.venv/bin/dylora train --output_dir $OUT --run_id early --progress false > $OUT/early.log 2>&1 &
P=$!
while ! grep -q "\"pid\": $P" $OUT/early/.lock 2>/dev/null; do sleep 0.05; done
t0=$(date +%s.%N); kill -TERM $P; wait $P; rc=$?; t1=$(date +%s.%N)
echo "SIGTERM during start-up: exit $rc after $(echo "$t1 - $t0" | bc) s"; tail -1 $OUT/early.log
