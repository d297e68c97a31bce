"""Codec speed on one CPU core: encode and decode throughput next to a plain copy, and the hook path.

    python -m benchmarks.codecs                         # 1, 4, 16, 64 MB; hook path at 4 ranks
    python -m benchmarks.codecs --sizes 4 --reps 3 --codecs qsgd4,topk1

Part 1 (one codec, one dense float32 tensor of the given size): seconds of `compress`, of
`decompress` of one payload, and of a plain copy of the same tensor into a preallocated buffer
(`dst.copy_(src)`, memory speed), run round-robin with the codec so both see the same load;
every time is the least CPU time of this thread over --reps runs (see `seconds`). GB/s = dense
bytes / seconds; "x copy" = seconds / copy seconds.

Part 2 (the hook path, one rank's view of an N-rank step): the gradients of the benchmark's mlp
(784-2048-2048-10, 5.8M values) go through the DDP hook's own codec: encode once (with error
feedback where the method uses it), then decode what N ranks sent (the all-gathered bytes of N
ranks, or the all-reduced sum once, or the shared-grid codes once). GradiVeQ ("gradiveq", the
registered method's defaults: tracked basis, one exchange, error feedback): encode = both sides of
each layer's slice matrix, decode = the projection, this rank's residual and the next bases. Each
quantizer runs its `QuantizedExchange` (for fp16 and bf16 the same values as the plain average the
hook sends, with the cast back counted as decoding). The collectives themselves are not run: their
results are prepared before timing.
Reported: encode, decode and total milliseconds and total / the copy of the same gradients. The
target is total <= 20x copy.

Everything runs in this process with torch.set_num_threads(1). Results: the tables, codecs.json and
codecs.md (with --results-md PATH, e.g. docs/codecs.md, the markdown report also goes to PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from commcomp import quantizers

__all__ = [
    "CODECS",
    "HOOK_METHODS",
    "MLP_SHAPES",
    "codec_rows",
    "format_table",
    "hook_rows",
    "main",
    "markdown",
    "tables",
]

# name -> (quantizer, options); "gradiveq" is the GradiVeQ layer codec with a fixed basis
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "qsgd2": ("qsgd", {"bits": 2}),
    "qsgd4": ("qsgd", {"bits": 4}),
    "qsgd8": ("qsgd", {"bits": 8}),
    "topk1": ("topk", {"ratio": 0.01}),
    "randk1": ("randk", {"ratio": 0.01, "rescale": False}),
    "sign": ("sign", {}),
    "gradiveq": ("gradiveq", {}),
}
GRADIVEQ_K, GRADIVEQ_D = 1024, 64  # slices of 1024 values, 64 components (K/d = 16)
MLP_SHAPES = [(2048, 784), (2048,), (2048, 2048), (2048,), (10, 2048), (10,)]


def seconds(fns: list[Callable[[], Any]], reps: int) -> list[float]:
    """The least CPU seconds of each of `fns` over `reps` rounds, after one warm-up round.

    CPU time of this thread (`time.thread_time`, user + system, page faults included), not wall
    clock: on a shared machine, time spent waiting for a core is not the codec's. The functions run
    round-robin (copy, encode, decode, copy, ...), so the baseline and the codec see the same load,
    and the minimum is the run least disturbed by other processes (caches, memory bandwidth).
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.thread_time()
            fn()
            best[i] = min(best[i], time.thread_time() - start)
    return best


class _GradiVeQ:
    """GradiVeQ's layer codec on [n / K, K] slices with a fixed orthonormal basis (d = 64)."""

    def __init__(self, n: int) -> None:
        from commcomp.gradiveq import LayerCodec, plan_slices

        plan = plan_slices((n // GRADIVEQ_K, GRADIVEQ_K), GRADIVEQ_K, GRADIVEQ_K, 1)
        if plan is None:
            raise ValueError(f"{n} values are too few for GradiVeQ slices of {GRADIVEQ_K}")
        self.codec = LayerCodec(plan)
        basis, _ = torch.linalg.qr(torch.randn(GRADIVEQ_K, GRADIVEQ_D, generator=torch.Generator().manual_seed(0)))
        self.codec.set_basis(basis.double(), torch.zeros(GRADIVEQ_K, dtype=torch.float64))

    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.compress(x.view(-1, GRADIVEQ_K), 1)

    def decompress(self, payload: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.codec.decompress(*payload)


def codec_rows(names: list[str], sizes_mb: list[float], reps: int) -> list[dict[str, Any]]:
    """Part 1: encode / decode / copy seconds of each codec at each size."""
    rows = []
    for mb in sizes_mb:
        n = int(mb * 1e6 / 4) // GRADIVEQ_K * GRADIVEQ_K
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        dst = torch.empty_like(x)
        for name in names:
            quantizer, options = CODECS[name]
            q: Any = _GradiVeQ(n) if quantizer == "gradiveq" else quantizers.get(quantizer, **options)
            payload = q.compress(x)
            copy, enc, dec = seconds(
                [partial(dst.copy_, x), partial(q.compress, x), partial(q.decompress, payload)], reps
            )
            rows.append(
                {
                    "part": "codec",
                    "codec": name,
                    "mb": mb,
                    "values": n,
                    "copy_s": copy,
                    "encode_s": enc,
                    "decode_s": dec,
                    "encode_gbs": 4 * n / enc / 1e9,
                    "decode_gbs": 4 * n / dec / 1e9,
                    "copy_gbs": 4 * n / copy / 1e9,
                }
            )
            print(
                f"  [codecs] {mb:g} MB {name}: encode {enc * 1e3:.1f} ms, decode {dec * 1e3:.1f} ms, "
                f"copy {copy * 1e3:.1f} ms",
                flush=True,
            )
    return rows


# method -> (quantizer, options incl. error_feedback) for the hook path
HOOK_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "qsgd2": ("qsgd", {"bits": 2}),
    "qsgd4": ("qsgd", {"bits": 4}),
    "qsgd8": ("qsgd", {"bits": 8}),
    "topk1+ef": ("topk", {"ratio": 0.01, "error_feedback": True}),
    "randk1+ef": ("randk", {"ratio": 0.01, "rescale": False, "error_feedback": True}),
    "sign+ef": ("sign", {"error_feedback": True}),
    "qsgd4_ar": ("qsgd_ar", {"bits": 4}),
    "sign_ar+ef": ("sign_ar", {"error_feedback": True}),
    "gradiveq": ("gradiveq", {}),  # the registered method's defaults (tracked basis, one exchange)
}


def _sim_state(quantizer: str, options: dict[str, Any], rank: int, world: int) -> Any:
    """The hook's own state (QuantizerState, or GradiVeQState for "gradiveq"), as rank `rank` of
    `world` without a process group: the agreement of shared-grid quantizers returns the local
    statistic (same cost, no collective)."""
    from commcomp.gradiveq import GradiVeQState
    from commcomp.hooks.quantized import QuantizerState

    def agree(self: Any, stats: torch.Tensor, op: str) -> torch.Tensor:
        del self, op
        return stats

    if quantizer == "gradiveq":
        return _as_rank(GradiVeQState, rank, world)(**options)
    return _as_rank(QuantizerState, rank, world, agree=agree)(quantizer=quantizer, **options)


def _as_rank(base: type, rank: int, world: int, **methods: Any) -> type:
    """`base` (a hook state) seen as rank `rank` of `world`, with `methods` replaced."""
    attrs = {"rank": property(lambda self: rank), "world_size": property(lambda self: world), **methods}
    return type(f"Simulated{base.__name__}", (base,), attrs)


def hook_rows(names: list[str], world: int, reps: int) -> list[dict[str, Any]]:
    """Part 2: the hook's codec on the mlp's gradients, one rank's encode and decode of N ranks."""
    from commcomp.hooks.quantized import QuantizedExchange

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) * 1e-3 for shape in MLP_SHAPES]
    keys = [f"p{i}" for i in range(len(grads))]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dst = torch.empty_like(flat)
    rows = []
    for name in names:
        quantizer, options = HOOK_METHODS[name]
        params = [(k, g.shape) for k, g in zip(keys, grads)]
        states = [_sim_state(quantizer, options, r, world) for r in range(world)]
        codecs = [s.exchange_codec(params, flat) if quantizer == "gradiveq" else QuantizedExchange(s) for s in states]
        sent = [c.encode(keys, [g.clone() for g in grads]) for c in codecs]  # what every rank sends
        if codecs[0].summed:  # the all-reduce's result: the element-wise sum of every rank's parts
            received = [torch.stack(parts).sum(0, dtype=parts[0].dtype) for parts in zip(*(e.parts for e in sent))]
        else:  # the all-gather's result: every rank's bytes (the engine strips the flag byte)
            received = [e.parts[0] for e in sent]
        mine = codecs[0]
        out = [g.clone() for g in grads]
        encoded = mine.encode(keys, out)
        copy, enc, dec = seconds(
            [partial(dst.copy_, flat), partial(_encode, mine, keys, grads), partial(mine.decode, received, encoded)],
            reps,
        )
        rows.append(_hook_row(name, world, flat.numel(), copy, enc, dec))
    return rows


def _encode(codec: Any, keys: list[str], grads: list[torch.Tensor]) -> None:
    """The hook's encoding: the codec's encode and the work it leaves for while the collective
    travels (`Encoded.later`, e.g. GradiVeQ's residuals)."""
    encoded = codec.encode(keys, grads)
    if encoded.later is not None:
        encoded.later()


def _hook_row(name: str, world: int, values: int, copy: float, enc: float, dec: float) -> dict[str, Any]:
    print(f"  [codecs] hook {name} at {world} ranks: {(enc + dec) / copy:.1f}x copy", flush=True)
    return {
        "part": "hook",
        "method": name,
        "ranks": world,
        "values": values,
        "copy_s": copy,
        "encode_s": enc,
        "decode_s": dec,
        "total_s": enc + dec,
        "x_copy": (enc + dec) / copy,
    }


def tables(rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of each part that has rows: the hook path first, then the codecs."""
    out = []
    part2 = [r for r in rows if r["part"] == "hook"]
    if part2:
        head = ["method", "ranks", "encode ms", "decode ms", "total ms", "copy ms", "total x copy", "<= 20x"]
        body = [
            [
                r["method"],
                str(r["ranks"]),
                f"{r['encode_s'] * 1e3:.1f}",
                f"{r['decode_s'] * 1e3:.1f}",
                f"{r['total_s'] * 1e3:.1f}",
                f"{r['copy_s'] * 1e3:.2f}",
                f"{r['x_copy']:.1f}",
                "yes" if r["x_copy"] <= 20 else "no",
            ]
            for r in part2
        ]
        title = f"Hook path at {part2[0]['ranks']} ranks ({part2[0]['values'] / 1e6:.1f}M gradient values)"
        out.append((title, head, body))
    part1 = [r for r in rows if r["part"] == "codec"]
    if part1:
        head = ["MB", "codec", "encode GB/s", "decode GB/s", "copy GB/s", "encode x copy", "decode x copy"]
        body = [
            [
                f"{r['mb']:g}",
                r["codec"],
                f"{r['encode_gbs']:.2f}",
                f"{r['decode_gbs']:.2f}",
                f"{r['copy_gbs']:.2f}",
                f"{r['encode_s'] / r['copy_s']:.1f}",
                f"{r['decode_s'] / r['copy_s']:.1f}",
            ]
            for r in part1
        ]
        out.append(("One codec, one dense float32 tensor, one core", head, body))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Both parts as aligned text tables."""
    return "\n\n".join(_align(head, body) for _, head, body in tables(rows))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report for docs: how it was made (command, date, machine, load) and both tables."""
    lines = [
        "# Codec speed",
        "",
        "Written by the codec benchmark itself (`benchmarks/codecs.py`); rerun it to refresh, do not edit. What "
        "it measures and how to read it: [quantizers.md](quantizers.md#speed).",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['cores']} cores ({meta['cpu']}), torch {meta['torch']}, {meta['threads']} thread; load "
        f"average {meta['load_before'][0]:.1f} before and {meta['load_after'][0]:.1f} after",
    ]
    for title, head, body in tables(rows):
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _align(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4,16,64", help="dense tensor sizes in MB (part 1)")
    p.add_argument("--codecs", default=",".join(CODECS), help=f"part 1 codecs, from {', '.join(CODECS)}")
    p.add_argument("--methods", default=",".join(HOOK_METHODS), help=f"part 2 methods, from {', '.join(HOOK_METHODS)}")
    p.add_argument("--ranks", type=int, default=4, help="ranks whose payloads the hook path decodes (part 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point (the fastest is reported)")
    p.add_argument("--out", default="", help="output directory (default results/<timestamp>)")
    p.add_argument("--results-md", default="", help="also write the markdown report here, e.g. docs/codecs.md")
    args = p.parse_args(argv)
    names = [c for c in args.codecs.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    for given, valid in ((names, CODECS), (methods, HOOK_METHODS)):
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"unknown name(s) {unknown}; valid names: {', '.join(valid)}")
    from benchmarks.driver import out_dir
    from benchmarks.run import machine

    torch.set_num_threads(1)
    out = out_dir(args.out)
    load_before = os.getloadavg()
    rows = codec_rows(names, [float(s) for s in args.sizes.split(",") if s], args.reps)
    rows += hook_rows(methods, args.ranks, args.reps)
    path = out / "codecs.json"
    meta = {
        **machine(),
        "command": " ".join(["python -m benchmarks.codecs", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": 1,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "codecs.md").write_text(markdown(rows, meta))
    if args.results_md:
        Path(args.results_md).write_text(markdown(rows, meta))
    print("\n" + format_table(rows) + f"\n\nresults: {path}, codecs.md")
    return rows


if __name__ == "__main__":
    main()
