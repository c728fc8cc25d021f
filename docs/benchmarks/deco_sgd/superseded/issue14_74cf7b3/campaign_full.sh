#!/usr/bin/env bash
# Full size (8 workers, 1.86 M MLP), seed 0, --quick's 3-point grid: after campaign.sh.
. "$(dirname "$0")/campaign_env.sh"
for s in varying_bandwidth bandwidth_swings high_latency; do
  log "full $s (grid3)"
  $PY -m deco_sgd bench $C/full_${s}_grid3.yaml --out $O/full_$s --cache $K/full_mnist --seeds 0 --no-progress || log "FAILED full $s"
done
log done
