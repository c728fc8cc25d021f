"""Per-layer codec work (docs/compactfusion.md, issue 11) of the compressed ring at P = 2 on the fast_link shape (K, V: 8 x 32 tokens x 4 x 32, fp16
wire): own encode + own-base decode (sender) + one peer decode (receiver) + finiteness checks, CPU time per layer."""
import sys, time, torch
torch.set_num_threads(1)
from compactfusion.config import CompactConfig
from compactfusion.state import CompactState
from compactfusion import attention as A
import inspect
codec = sys.argv[1]
cfg = CompactConfig(codec=codec, wire_dtype="fp16")
sa, sb = CompactState(cfg), CompactState(cfg)
g = torch.Generator().manual_seed(0)
k = torch.randn(8, 32, 4, 32, generator=g); v = torch.randn(8, 32, 4, 32, generator=g)
new = "like" in inspect.signature(A._decode_pair).parameters and "nk" not in inspect.signature(A._decode_pair).parameters
def layer(step):
    out = A._encode_own(sa, 0, 0, 0, k + 0.01 * step, v + 0.01 * step, True)
    sa.settle()
    if new:
        A._decode_pair(sb, 0, 0, 0, out[0], k, True)
    else:
        A._decode_pair(sb, 0, 0, 0, out[0], out[1], k, True)
    sa.raise_nonfinite(0); sb.raise_nonfinite(0)
for s in range(5): layer(s)
best = []
for rep in range(5):
    t0 = time.process_time()
    for s in range(100): layer(5 + s)
    best.append((time.process_time() - t0) / 100)
print(f"{codec}: {min(best)*1e6:.0f} us per layer (min of 5 x 100 layers, CPU time)")
