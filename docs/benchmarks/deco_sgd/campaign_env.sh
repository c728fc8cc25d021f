# Shared preamble of the benchmark scripts here (sourced, not run): the repository root as the
# working directory, the interpreter, the config/output/cache paths and a log line with the load.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
PY=${PY:-.venv/bin/python}
C=docs/benchmarks/deco_sgd/configs
O=docs/benchmarks/deco_sgd
K=/work/deco_cache/v4
log() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) $*"; }
