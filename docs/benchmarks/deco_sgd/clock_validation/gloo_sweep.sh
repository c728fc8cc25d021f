#!/usr/bin/env bash
# Single gloo collectives on real namespaces (root), one net per (n, one-way latency):
#   bash docs/benchmarks/deco_sgd/clock_validation/gloo_sweep.sh OUTDIR "N:LAT ..." [ITERS]
# Writes OUTDIR/gloo_n{N}_l{LAT}.json: {"n", "latency_ms", "bandwidth_mbps", "loadavg_before",
# "loadavg_after", "commit", "sweep": {op: {bytes: [seconds per iteration]}}}.
set -euo pipefail
out=$1; configs=$2; iters=${3:-5}
py=${PY:-/work/main/.venv/bin/python}
sizes=${SIZES:-4,12000,51000,204000,408000,816000,3264000}
mkdir -p "$out"
for c in $configs; do
  n=${c%%:*}; lat=${c##*:}
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  raw=$(mktemp /tmp/gloo_sweep.XXXXXX)
  PYTHONPATH=$PWD "$py" -m netsim up -n "$n" --bandwidth-mbps 20 --latency-ms "$lat" --tag gm \
      --run "$py -m netsim.probe.agent gloo-sweep --ops allreduce,allgather --bytes $sizes --iters $iters" \
      >"$raw" 2>&1 || { echo "netsim up failed (n=$n, $lat ms): see $raw" >&2; exit 1; }
  line=$(grep '"sweep"' "$raw" | sed -n 1p)
  rm -f "$raw"
  after=$(cut -d' ' -f1-3 /proc/loadavg)
  "$py" - "$out/gloo_n${n}_l${lat}.json" "$n" "$lat" "$before" "$after" "$(git rev-parse --short HEAD)" "$line" <<'PY'
import json, sys
path, n, lat, before, after, commit, line = sys.argv[1:]
rec = {"n": int(n), "latency_ms": float(lat), "bandwidth_mbps": 20.0, "loadavg_before": before,
       "loadavg_after": after, "commit": commit, **json.loads(line)}
json.dump(rec, open(path, "w"), indent=1)
print(path, before, "->", after)
PY
done
