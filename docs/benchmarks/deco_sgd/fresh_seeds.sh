#!/usr/bin/env bash
# Seeds 3-5, which no development round or campaign used: every method trains (its own cache,
# /work/deco_cache/seeds345): the quick MNIST scenarios, the four hold-outs and full size, at this code.
# Made at 899e084 (same library code as 4aa4f86) on 2026-12-08 from 00:00 UTC (fresh_seeds.log;
# that run wrote to /work/exp/seeds345 with the same commands, then was copied here).
. "$(dirname "$0")/campaign_env.sh"
K=/work/deco_cache/seeds345
F=$O/fresh_seeds_345
mkdir -p $K/quick_mnist $K/cnn $K/bytelm $K/full_mnist
for s in varying_bandwidth high_latency bandwidth_swings; do
  log "quick $s"
  $PY -m deco_sgd bench examples/deco_sgd/$s.yaml --out $F/quick_$s --cache $K/quick_mnist --quick --seeds 3,4,5 --no-progress || log "FAILED quick $s"
done
for s in high_latency varying_bandwidth; do
  log "holdout cnn $s"
  $PY -m deco_sgd bench examples/deco_sgd/holdout_cnn_$s.yaml --out $F/holdout_cnn_$s --cache $K/cnn --seeds 3,4,5 --no-progress || log "FAILED cnn $s"
done
for s in high_latency varying_bandwidth; do
  log "holdout bytelm $s"
  $PY -m deco_sgd bench $C/holdout_bytelm_${s}_nococktail.yaml --out $F/holdout_bytelm_$s --cache $K/bytelm --seeds 3,4,5 --no-progress || log "FAILED bytelm $s"
done
for s in bandwidth_swings varying_bandwidth high_latency; do
  log "full $s seeds 3,4,5"
  $PY -m deco_sgd bench $C/full_${s}_grid3.yaml --out $F/full_$s --cache $K/full_mnist --seeds 3,4,5 --no-progress || log "FAILED full $s"
done
log done
