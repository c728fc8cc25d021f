#!/usr/bin/env bash
# static_apriori again, now freezing DeCo-SGD's first value format too (ea10028); every other
# run (DeCo-SGD included, trained at a17eba7: the controller's code did not change since) is
# reused from the caches. The reports and results.json are rewritten.
. "$(dirname "$0")/campaign_env.sh"
rm -f $K/*/static_apriori__*
for s in varying_bandwidth high_latency bandwidth_swings; do
  log "quick $s"
  $PY -m deco_sgd bench examples/deco_sgd/$s.yaml --out $O/quick_$s --cache $K/quick_mnist --quick --seeds 0,1,2 --no-progress || log "FAILED quick $s"
done
for s in varying_bandwidth bandwidth_swings high_latency; do
  log "full $s (grid3)"
  $PY -m deco_sgd bench $C/full_${s}_grid3.yaml --out $O/full_$s --cache $K/full_mnist --seeds 0 --no-progress || log "FAILED full $s"
done
log done
