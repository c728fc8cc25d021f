"""CPU-time proxy of the fast_link comparison: per-rank process CPU seconds per request (max over ranks)."""
import statistics, sys, time
import torch
from ccomm.ranks import RankPool

METHODS = [("ring", "none"), ("ring", "binary"), ("ring", "int2")]

def prep(rank, world):
    torch.set_num_threads(1)
    import compactfusion as cf
    from compactfusion.models.tiny_dit import load_tiny_dit
    global MODELS
    MODELS = {}
    for mode, codec in METHODS:
        m = load_tiny_dit().eval()
        h = cf.parallelize(m, cf.CompactConfig(mode=mode, codec=codec, wire_dtype="fp16"))
        MODELS[(mode, codec)] = (m, h)
    return True

def run(rank, world, key):
    from compactfusion.models.sample import sample
    m, h = MODELS[tuple(key)]
    h.reset()
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        sample(m, torch.tensor([0, 1, 2, 3]), steps=28, guidance=2.0, seed=0)
    return time.process_time() - c0, time.perf_counter() - w0

if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    pool = RankPool(2, group_timeout_s=300, start_timeout_s=300)
    try:
        pool.run(prep, timeout=600)
        res = {k: [] for k in METHODS}
        for r in range(reps + 1):
            for k in METHODS:
                out = pool.run(run, list(k), timeout=600)
                if r:
                    res[k].append((max(o[0] for o in out), max(o[1] for o in out)))
        base = statistics.median(c for c, _ in res[METHODS[0]])
        for k, v in res.items():
            cm = statistics.median(c for c, _ in v); wm = statistics.median(w for _, w in v)
            print(f"{k[0]}+{k[1]}: cpu {cm:.3f} s ({cm / base:.3f}x ring)  wall {wm:.3f} s")
    finally:
        pool.close()
