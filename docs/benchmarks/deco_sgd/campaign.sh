#!/usr/bin/env bash
# Issue 14 campaign: DeCo-SGD and static-a-priori train; every controller-independent
# run comes from the caches filled by fill.sh. Run from the repository root.
. "$(dirname "$0")/campaign_env.sh"
# A cached run is reused by its config fingerprint; drop every controller-dependent record so
# DeCo-SGD and static-a-priori train with this code. (Since the campaign at 504a966 the runner
# also retrains such records when they were made by other code: deco_sgd.bench.provenance.)
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
# Full size (8 workers, 1.86 M MLP), the quick 3-point grid, seeds 0-2.
for s in bandwidth_swings varying_bandwidth high_latency; do
  log "full $s seeds 0,1,2"
  $PY -m deco_sgd bench $C/full_${s}_grid3.yaml --out $O/full_$s --cache $K/full_mnist --seeds 0,1,2 --no-progress || log "FAILED full $s"
done
log done
