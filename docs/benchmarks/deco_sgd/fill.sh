#!/usr/bin/env bash
# Controller-independent runs (static grid, D-SGD, cocktail, DGA, PowerSGD) into fresh caches.
. "$(dirname "$0")/campaign_env.sh"
for s in varying_bandwidth high_latency bandwidth_swings; do
  log "fill quick $s"
  $PY -m deco_sgd bench $C/fill_$s.yaml --out /tmp/fill_$s --cache /work/deco_cache/v4/quick_mnist --quick --seeds 0,1,2 || log "FAILED $s"
done
log "fill cnn"
$PY -m deco_sgd bench $C/fill_holdout_cnn.yaml --out /tmp/fill_cnn --cache /work/deco_cache/v4/cnn --seeds 0,1,2 || log FAILED cnn
log "fill bytelm"
$PY -m deco_sgd bench $C/fill_holdout_bytelm.yaml --out /tmp/fill_bytelm --cache /work/deco_cache/v4/bytelm --seeds 0,1,2 || log FAILED bytelm
log "done"
