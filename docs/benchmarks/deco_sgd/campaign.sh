#!/usr/bin/env bash
# Issue 14 campaign (this session): DeCo-SGD and static-a-priori train; every controller-independent
# run comes from the caches filled by fill.sh. Run from the repository root.
. "$(dirname "$0")/campaign_env.sh"
# A cached run is reused by its config fingerprint, which does not see the controller's code:
# drop every controller-dependent record so DeCo-SGD and static-a-priori train with this code.
rm -f $K/*/deco__* $K/*/static_apriori__*
for s in varying_bandwidth high_latency bandwidth_swings; do
  log "quick $s"
  $PY -m deco_sgd bench examples/deco_sgd/$s.yaml --out $O/quick_$s --cache $K/quick_mnist --quick --seeds 0,1,2 --no-progress || log "FAILED quick $s"
done
for s in high_latency varying_bandwidth; do
  log "holdout cnn $s"
  $PY -m deco_sgd bench examples/deco_sgd/holdout_cnn_$s.yaml --out $O/holdout_cnn_$s --cache $K/cnn --seeds 0,1,2 --no-progress || log "FAILED cnn $s"
  log "holdout bytelm $s"
  $PY -m deco_sgd bench $C/holdout_bytelm_${s}_nococktail.yaml --out $O/holdout_bytelm_$s --cache $K/bytelm --seeds 0,1,2 --no-progress || log "FAILED bytelm $s"
done
log "full high_latency (dsgd, deco)"
$PY -m deco_sgd bench $C/full_high_latency_dsgd_deco.yaml --out $O/full_high_latency --cache $K/full_mnist --seeds 0 --no-progress || log "FAILED full"
log done
