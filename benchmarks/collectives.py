"""Collective bandwidth: fp32 all-reduce versus each compressor's collective, payloads 1 to 64 MB.

    python -m benchmarks.collectives                       # 4 hosts at 100 Mbit/s, 1..64 MB
    python -m benchmarks.collectives --payloads 4,16 --local

Each rank holds a float32 vector of the payload size (the "dense" bytes) and reduces it with:
  fp32      all-reduce of the vector (what DDP does)
  fp16      commcomp fp16: cast, all-reduce the halves, cast back
  gradiveq  commcomp's GradiVeQ codec (LayerCodec) with a fixed orthonormal basis, K = 1024,
            d = 64 (K/d = 16): encode, all-reduce the coefficients, decode
  qsgd4, topk1, sign  commcomp quantizers: encode, all-gather the packed bytes, decode every rank's
            payload in one pass (decode_sum) and average
  qsgd4_ar, sign_ar  the same quantizers on a grid shared by every rank (qsgd_ar, sign_ar): a tiny
            all-reduce agrees on the scales, the integer codes are summed by a second all-reduce
            (int8 up to 18 ranks for 4 bits, 127 for sign) and decoded once
Columns: seconds (median of --reps, encode and decode included), effective bandwidth (dense bytes /
time), bytes handed to the collective, wire bytes (what the host's interface transmitted, read
from its counters in /sys/class/net; on loopback, where every process shares the counter, the
ring algorithms' 2(n-1)/n B for all-reduce and (n-1) B for all-gather instead), wire efficiency
(wire bytes / communication time / link rate; communication time = total minus encode/decode)
and the ring all-reduce limit 2(n-1)/n * dense bytes / link rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from commcomp import quantizers
from commcomp.gradiveq import LayerCodec, plan_slices
from commcomp.quantizers import SharedScaleQuantizer, pack_payloads, unpack_batch
from commcomp.stats import timer

__all__ = ["METHODS", "format_table", "main", "measure", "plot"]

METHODS = ["fp32", "fp16", "gradiveq", "qsgd4", "qsgd4_ar", "topk1", "sign", "sign_ar"]
GRADIVEQ_K, GRADIVEQ_D = 1024, 64


def _tx_bytes() -> int | None:
    """This host's transmitted bytes, if it has its own interface (None on loopback)."""
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "")
    path = Path(f"/sys/class/net/{iface}/statistics/tx_bytes")
    if not iface or iface == "lo" or not path.exists():
        return None
    return int(path.read_text())


def _quantizer(method: str) -> quantizers.Quantizer:
    options: dict[str, tuple[str, dict[str, Any]]] = {
        "fp16": ("fp16", {}),
        "qsgd4": ("qsgd", {"bits": 4}),
        "topk1": ("topk", {"ratio": 0.01}),
        "sign": ("sign", {}),
        "qsgd4_ar": ("qsgd_ar", {"bits": 4}),
        "sign_ar": ("sign_ar", {}),
    }
    name, kw = options[method]
    return quantizers.get(name, **kw)


def _gradiveq_codec(n: int, device: torch.device) -> LayerCodec:
    plan = plan_slices((n // GRADIVEQ_K, GRADIVEQ_K), GRADIVEQ_K, GRADIVEQ_K, 1)
    if plan is None or plan.K != GRADIVEQ_K:
        raise ValueError(f"payload too small for GradiVeQ slices of {GRADIVEQ_K} values")
    codec = LayerCodec(plan)
    gen = torch.Generator().manual_seed(0)  # the same basis on every rank
    basis, _ = torch.linalg.qr(torch.randn(GRADIVEQ_K, GRADIVEQ_D, generator=gen, dtype=torch.float64))
    codec.set_basis(basis.to(device), torch.zeros(GRADIVEQ_K, dtype=torch.float64, device=device))
    return codec


def _once(method: str, x: torch.Tensor, codec: Any) -> tuple[float, float, int, str]:
    """One reduction of x: (total seconds, encode+decode seconds, bytes handed over, collective)."""
    n = dist.get_world_size()
    start = time.perf_counter()
    if method == "fp32":
        dist.all_reduce(x)
        return time.perf_counter() - start, 0.0, x.numel() * x.element_size(), "all_reduce"
    if method == "gradiveq":
        g = x.view(-1, GRADIVEQ_K)
        with timer(x) as enc:
            coeffs, rest = codec.compress(g / n, n)
            flat = torch.cat([coeffs.reshape(-1), rest])
        dist.all_reduce(flat)
        with timer(x) as dec:
            codec.decompress(flat[: coeffs.numel()].view_as(coeffs), flat[coeffs.numel() :])
        return time.perf_counter() - start, enc.seconds + dec.seconds, flat.numel() * flat.element_size(), "all_reduce"
    q = codec
    if isinstance(q, SharedScaleQuantizer):
        return _once_shared(q, x, n)
    with timer(x) as enc:
        payload = q.compress(x / n if q.linear else x)
        flat = payload.tensors[0] if q.linear else pack_payloads([payload])
    if q.linear:
        dist.all_reduce(flat)
        with timer(x) as dec:
            q.decompress(payload)
        kind = "all_reduce"
    else:
        gathered = torch.empty(n * flat.numel(), dtype=flat.dtype, device=flat.device)
        dist.all_gather_into_tensor(gathered, flat)
        gathered = gathered.view(n, -1)  # one row per rank
        with timer(x) as dec:
            q.decode_sum(unpack_batch(gathered, [payload])[0], torch.empty(x.numel(), device=x.device)).div_(n)
        kind = "all_gather"
    return time.perf_counter() - start, enc.seconds + dec.seconds, flat.numel() * flat.element_size(), kind


def _once_shared(q: SharedScaleQuantizer, x: torch.Tensor, n: int) -> tuple[float, float, int, str]:
    """A shared-grid quantizer: agree on the scales (all-reduce), all-reduce the codes, decode once."""
    start = time.perf_counter()
    op = dist.ReduceOp.MAX if q.agree_op == "max" else dist.ReduceOp.SUM
    with timer(x) as stats_time:
        h = x / n
        agreed = q.local_stats(h)
    dist.all_reduce(agreed, op=op)
    with timer(x) as enc:
        payload = q.compress_shared(h, agreed, n)
    codes = payload.tensors[0]
    dist.all_reduce(codes)
    with timer(x) as dec:
        q.decompress(payload)
    codec = stats_time.seconds + enc.seconds + dec.seconds
    sent = agreed.numel() * agreed.element_size() + codes.numel() * codes.element_size()
    return time.perf_counter() - start, codec, sent, "all_reduce"


def measure(method: str, payload_mb: float, reps: int, device: torch.device) -> dict[str, Any]:
    """Time `reps` reductions (after one warm-up) of a payload_mb float32 vector on every rank."""
    n = int(payload_mb * 1e6 / 4) // GRADIVEQ_K * GRADIVEQ_K
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(n, generator=gen).to(device)
    codec = _gradiveq_codec(n, device) if method == "gradiveq" else None if method == "fp32" else _quantizer(method)
    set_rank = getattr(codec, "set_rank", None)
    if set_rank is not None:
        set_rank(dist.get_rank())  # independent rounding noise per rank
    _once(method, x.clone(), codec)
    totals, codecs, wire = [], [], []
    sent, kind = 0, ""
    for _ in range(reps):
        y = x.clone()
        dist.barrier()
        tx = _tx_bytes()
        total, codec_s, sent, kind = _once(method, y, codec)
        tx_after = _tx_bytes()
        totals.append(total)
        codecs.append(codec_s)
        if tx is not None and tx_after is not None:
            wire.append(tx_after - tx)
    return {
        "method": method,
        "payload_mb": payload_mb,
        "dense_bytes": n * 4,
        "bytes_sent": sent,
        "collective": kind,
        "seconds": statistics.median(totals),
        "codec_seconds": statistics.median(codecs),
        "measured_wire_bytes": statistics.median(wire) if wire else None,
    }


def derive(row: dict[str, Any], world: int, rate_mbit: float | None) -> dict[str, Any]:
    """Add bandwidth, wire bytes/efficiency and the ring limit to a measured row."""
    model = (2 * (world - 1) / world if row["collective"] == "all_reduce" else world - 1) * row["bytes_sent"]
    wire = row["measured_wire_bytes"] if row["measured_wire_bytes"] is not None else model
    comm = max(row["seconds"] - row["codec_seconds"], 1e-9)
    rate = None if rate_mbit is None else rate_mbit * 1e6 / 8
    row.update(
        world_size=world,
        rate_mbit=rate_mbit,
        wire_bytes=wire,
        wire_bytes_source="interface counter" if row["measured_wire_bytes"] is not None else "ring model",
        effective_gbit=row["dense_bytes"] * 8 / row["seconds"] / 1e9,
        wire_efficiency=None if rate is None else wire / comm / rate,
        ring_limit_seconds=None if rate is None else 2 * (world - 1) / world * row["dense_bytes"] / rate,
    )
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "payload MB",
        "method",
        "collective",
        "seconds",
        "eff. Gbit/s",
        "MB sent",
        "wire MB",
        "wire eff.",
        "ring limit s",
    ]
    body = []
    for r in rows:
        eff = "-" if r["wire_efficiency"] is None else f"{100 * r['wire_efficiency']:.0f}%"
        limit = "-" if r["ring_limit_seconds"] is None else f"{r['ring_limit_seconds']:.3f}"
        body.append(
            [
                f"{r['payload_mb']:g}",
                r["method"],
                r["collective"],
                f"{r['seconds']:.3f}",
                f"{r['effective_gbit']:.3f}",
                f"{r['bytes_sent'] / 1e6:.3f}",
                f"{r['wire_bytes'] / 1e6:.3f}",
                eff,
                limit,
            ]
        )
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Time and wire efficiency versus payload, one line per method, with the ring limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        a.plot([r["payload_mb"] for r in mine], [r["seconds"] for r in mine], marker="o", label=m)
        if all(r["wire_efficiency"] is not None for r in mine):
            b.plot([r["payload_mb"] for r in mine], [100 * r["wire_efficiency"] for r in mine], marker="o", label=m)
    fp32 = [r for r in rows if r["method"] == "fp32" and r["ring_limit_seconds"] is not None]
    if fp32:
        a.plot(
            [r["payload_mb"] for r in fp32], [r["ring_limit_seconds"] for r in fp32], "k--", label="ring limit (fp32)"
        )
    a.set(xscale="log", yscale="log", xlabel="payload MB (dense)", ylabel="seconds", title="reduction time")
    b.axhline(85, color="gray", linestyle=":", label="85% target")
    b.set(xscale="log", xlabel="payload MB (dense)", ylabel="% of link rate", title="wire efficiency")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def worker(argv: list[str]) -> None:
    """Runs on every host (under torchrun): measure every method at every payload; rank 0 writes."""
    p = argparse.ArgumentParser()
    p.add_argument("--payloads", default="1,2,4,8,16,32,64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate-mbit", type=float, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from launch.dist import finish, init_from_env

    info = init_from_env()
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid names: {', '.join(METHODS)}")
    rows = []
    for mb in [float(v) for v in args.payloads.split(",") if v]:
        for m in methods:
            row = derive(measure(m, mb, args.reps, info.device), info.world_size, args.rate_mbit)
            rows.append(row)
            if info.rank == 0:
                eff = "" if row["wire_efficiency"] is None else f", wire eff. {100 * row['wire_efficiency']:.0f}%"
                print(f"  [collectives] {mb:g} MB {m}: {row['seconds']:.3f} s{eff}", flush=True)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({"rows": rows}))
        print(f"wrote {args.out}", flush=True)
    finish()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Driver: bring up the hosts, run the worker on each, print the table, write JSON and PNG."""
    from benchmarks.driver import add_cluster_options, out_dir, pick_hosts, torchrun

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_options(p)
    p.add_argument("--payloads", default="1,2,4,8,16,32,64", help="payload sizes in MB")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per point (median reported)")
    args = p.parse_args(argv)
    out = out_dir(args.out)
    hosts, where = pick_hosts(args)
    print(f"collective bandwidth on {where}; results in {out}", flush=True)
    path = out / "collectives.json"
    with hosts:
        worker_args = ["--worker", "--payloads", args.payloads, "--methods", args.methods, "--reps", str(args.reps)]
        if hosts.rate_mbit is not None:
            worker_args += ["--rate-mbit", str(hosts.rate_mbit)]
        torchrun(hosts, "collectives.py", [*worker_args, "--out", str(path)], args.timeout, args.nproc_per_node)
    rows = json.loads(path.read_text())["rows"]
    path.write_text(json.dumps({"meta": {"where": where}, "rows": rows}, indent=1))
    print("\n" + format_table(rows))
    plot(rows, str(out / "collectives.png"))
    print(f"\nresults: {path}, {out / 'collectives.png'}")
    return rows


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker([a for a in sys.argv[1:] if a != "--worker"])
    else:
        main()
