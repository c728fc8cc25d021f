"""Codec benchmark: `python -m ccomm.bench [--sizes 1M,16M,64M] [--out FILE]`.

`python -m ccomm.bench --NAME [ARGS]` runs the benchmark plugin NAME instead. Plugins are
entry points of the group ``ccomm.bench`` (:data:`PLUGIN_GROUP`) whose target is a
``main(argv) -> int``; ccomm imports none of them (it knows the name ``collectives`` only to
explain a missing registration). netsim registers ``collectives`` in
``pyproject.toml`` (ring vs ``algo="auto"`` under ``netsim.emulate``,
``python -m ccomm.bench --collectives [--quick] [--out FILE]``), since it needs netsim, a
layer above ccomm that ccomm never imports.

For every codec and size it measures encode + decode time on one fp32 tensor as a multiple
of `clone()` of the same tensor timed in the same run (``x_clone``; interleaved, median of
repeats), plus the payload bytes, the compression ratio against fp32 and the relative error
||decode(encode(x)) - x|| / ||x|| (terms: docs/glossary.md). It prints a markdown table and
writes it to `--out`. Multiples of clone(), not absolute times, are what transfers between machines.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .registry import make_codec

__all__ = ["DEFAULT_SPECS", "PLUGIN_GROUP", "TARGETS", "Row", "plugins", "run", "to_markdown", "publish", "main"]

#: Entry-point group of benchmark plugins: ``NAME = "package.module:main"``, run by ``--NAME``.
PLUGIN_GROUP = "ccomm.bench"

#: One representative spec per codec (activation codecs see the tensor as N x 1024).
DEFAULT_SPECS: tuple[str, ...] = (
    "identity",
    "fp16",
    "bf16",
    "topk:ratio=0.01",
    "approx_topk:ratio=0.01",
    "randomk:ratio=0.01",
    "quantize:bits=8",
    "quantize:bits=4",
    "quantize:bits=2",
    "qsgd:levels=16",
    "sign",
    "binary",
    "int2",
    "lowrank:rank=8",
    "lowrank_int4:rank=32",
    "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4",
)

#: Targets on encode + decode time as a multiple of clone(), by codec name (issue #2).
TARGETS: dict[str, float] = {"quantize": 4.0, "sign": 4.0, "binary": 4.0, "int2": 4.0, "approx_topk": 8.0}

CHANNELS = 1024


@dataclass(frozen=True)
class Row:
    spec: str
    numel: int
    encode_s: float
    decode_s: float
    clone_s: float
    nbytes: int
    rel_error: float

    @property
    def x_clone(self) -> float:
        """(encode + decode time) / clone() time: the codec's cost in copies of the tensor."""
        return (self.encode_s + self.decode_s) / self.clone_s

    @property
    def compression(self) -> float:
        return self.numel * 4 / self.nbytes

    @property
    def target(self) -> float | None:
        return TARGETS.get(self.spec.split(":")[0].split("|")[0]) if "|" not in self.spec else None


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        raise ValueError(f"sizes: {text!r} is not a size like 1M, 16M or 1048576") from None


def run(specs: Sequence[str], sizes: Sequence[int], repeats: int = 3, seed: int = 0, progress: bool = True) -> list[Row]:
    rows: list[Row] = []
    bar = tqdm(total=len(specs) * len(sizes), disable=not progress, desc="codecs", file=sys.stderr)
    for n in sizes:
        if n % CHANNELS:
            raise ValueError(f"sizes: {n} is not a multiple of {CHANNELS}")
        x = torch.randn(n // CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(seed))
        for spec in specs:
            bar.set_postfix_str(f"{spec} n={n}")
            codec = make_codec(spec)
            payload = codec.encode(x)  # warm-up, and the payload measured below
            y = codec.decode(payload)
            rel = float(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x))
            enc, dec, clo = [], [], []
            for _ in range(repeats):
                # Interleaving clone with the codec exposes both to the same machine state.
                clo.append(_time(lambda: x.clone()))
                t0 = time.perf_counter()
                p = codec.encode(x)
                t1 = time.perf_counter()
                codec.decode(p)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                dec.append(t2 - t1)
            rows.append(
                Row(spec, n, statistics.median(enc), statistics.median(dec), statistics.median(clo), payload.nbytes, rel)
            )
            bar.update()
        del x
    bar.close()
    return rows


def _fmt_size(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


def to_markdown(rows: Sequence[Row], command: str, repeats: int) -> str:
    lines = [
        "# Codec benchmark",
        "",
        f"Command: `{command}`  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}  ",
        f"Input: fp32 randn viewed as (n/{CHANNELS}, {CHANNELS}); times are medians of {repeats} runs; "
        "`x clone` is (encode + decode) / clone() of the same tensor, measured interleaved in this run.",
        "",
        "| codec | n | encode ms | decode ms | clone ms | x clone | target | payload bytes | compression | rel. error |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        tgt = "" if r.target is None else (f"<= {r.target:g}: " + ("met" if r.x_clone <= r.target else "MISSED"))
        lines.append(
            f"| `{r.spec.replace('|', chr(92) + '|')}` | {_fmt_size(r.numel)} | {r.encode_s * 1e3:.1f} | {r.decode_s * 1e3:.1f} | "
            f"{r.clone_s * 1e3:.1f} | {r.x_clone:.2f} | {tgt} | {r.nbytes:,} | {r.compression:.1f}x | {r.rel_error:.4f} |"
        )
    lines += ["", *_target_notes(rows)]
    return "\n".join(lines) + "\n"


def _target_notes(rows: Sequence[Row]) -> list[str]:
    """Which targets were missed, and the clone() speed that explains misses at small sizes."""
    sizes = sorted({r.numel for r in rows})
    clone_gbs = {n: statistics.median(r.numel * 4 / r.clone_s for r in rows if r.numel == n) / 1e9 for n in sizes}
    targeted = [r for r in rows if r.target is not None]
    missed = [r for r in targeted if r.x_clone > r.target]  # type: ignore[operator]
    out = ["## Targets", ""]
    out.append(f"{len(targeted) - len(missed)} of {len(targeted)} targeted measurements met their target.")
    out.append("clone() copied " + ", ".join(f"{clone_gbs[n]:.1f} GB/s at {_fmt_size(n)}" for n in sizes) + ".")
    if missed:
        out += ["", "Missed:"]
        out += [f"- `{r.spec}` at {_fmt_size(r.numel)}: {r.x_clone:.2f}x clone (target {r.target:g}x)" for r in missed]
        small = [r for r in missed if r.numel == sizes[0]]
        if small and len(sizes) > 1 and clone_gbs[sizes[0]] > 1.5 * clone_gbs[sizes[-1]]:
            out += [
                "",
                f"Why the misses at {_fmt_size(sizes[0])}: that tensor fits in the CPU cache, so clone() is a "
                f"cache-speed copy ({clone_gbs[sizes[0]]:.1f} GB/s against {clone_gbs[sizes[-1]]:.1f} GB/s at "
                f"{_fmt_size(sizes[-1])}) taking a fraction of a millisecond, while every codec pays a fixed cost "
                "per call for dispatching its 10-30 tensor operations. At the larger sizes both are bound by "
                "memory traffic and the multiple of clone() measures the codec's real work.",
            ]
    return out


def publish(md: str, out: Path) -> None:
    """Write a benchmark's markdown table to `out` (creating its directory) and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(md)
    print(f"written to {out}", file=sys.stderr)


def plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed benchmark plugins by name (entry points of :data:`PLUGIN_GROUP`)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}


#: Plugins this repository registers in pyproject.toml, for the error when one is missing.
_KNOWN_PLUGINS = ("collectives",)


def _run_plugin(args_in: list[str]) -> int | None:
    """Run the plugin named by the first ``--NAME`` argument, if any; None when there is none."""
    found = plugins()
    for arg in args_in:
        name = arg[2:] if arg.startswith("--") else ""
        if name in found:
            args_in.remove(arg)
            return int(found[name].load()(args_in))
        if name in _KNOWN_PLUGINS:
            print(f"python -m ccomm.bench: --{name}: no {PLUGIN_GROUP!r} entry point named {name!r} is "
                  f"installed (installed: {', '.join(sorted(found)) or 'none'}); it is declared in "
                  "pyproject.toml, so reinstall the package (`pip install -e .`) to register it",
                  file=sys.stderr)
            return 2
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    code = _run_plugin(args_in)
    if code is not None:
        return code
    ap = argparse.ArgumentParser(prog="python -m ccomm.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,16M,64M", help="comma-separated element counts (default 1M,16M,64M)")
    ap.add_argument("--codecs", default=None, help="';'-separated specs (default: one per codec and the Cocktail chain)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/codecs.md"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        specs = [s.strip() for s in args.codecs.split(";")] if args.codecs else list(DEFAULT_SPECS)
        for s in specs:
            make_codec(s)
        if args.repeats < 1:
            raise ValueError(f"repeats: {args.repeats} must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = run(specs, sizes, repeats=args.repeats, seed=args.seed, progress=not args.no_progress)
    command = "python -m ccomm.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(to_markdown(rows, command.strip(), args.repeats), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
