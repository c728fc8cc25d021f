#!/usr/bin/env bash
# After the campaign at 74cf7b3 (run at e821d2c: no controller change since 74cf7b3): the
# three full-size scenarios with seeds 0-2 instead of seed 0 alone. Seed 0's runs are reused
# from the campaign's cache; seeds 1 and 2 train every method. Run from the repository root.
# (The session ran this loop with --out under /work/full3 and copied the directories here.)
. "$(dirname "$0")/campaign_env.sh"
for s in bandwidth_swings varying_bandwidth high_latency; do
  log "full $s seeds 0,1,2"
  $PY -m deco_sgd bench $C/full_${s}_grid3.yaml --out $O/full3_$s --cache $K/full_mnist --seeds 0,1,2 --no-progress || log "FAILED full $s"
done
log done
