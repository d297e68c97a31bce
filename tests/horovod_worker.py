"""Worker script for tests/test_horovod.py, launched by `horovodrun -np N --gloo` or `mpirun -np N`.

    python tests/horovod_worker.py SCENARIO OUTDIR

Each rank runs SCENARIO and writes what it measured to OUTDIR/SCENARIO-rank<r>.pt; the test
compares ranks with each other and with the same training run under DDP (tests/harness.py). The
models, batches and training loops live here so that both sides use the very same code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bucketed_net import Net, batch, params
from torch import nn

from commcomp import quantizers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the workloads (benchmarks.data) live in the repository, not in commcomp
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------- shared with the DDP side
# (the conv model, its batches and its flat parameters are tests/bucketed_net.py's)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


GRADIVEQ = dict(warmup_steps=2, wire_dtype="fp32")  # the tracked basis, two dense steps first
GRADIVEQ_TWO = dict(GRADIVEQ, exchanges=2)  # the same with the two-exchange power step
GRADIVEQ_FITTED = dict(basis="fitted", warmup_steps=2, sample_steps=3, compress_steps=4)
QSGD = dict(bits=4, bucket_size=64, seed=7)
PARITY_STEPS = 12  # warm-up, sampling, a refit, compressed steps and the next cycle's sampling


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return Net() if kind == "conv" else mlp()


def train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range, after: Callable[[], None]) -> None:
    for step in steps:
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after()


# --------------------------------------------------------------------------- Horovod side


def _identical_everywhere(model: nn.Module) -> bool:
    import horovod.torch as hvd

    p = params(model)
    everyone = hvd.allgather(p.unsqueeze(0), name="test.identical")
    return all(torch.equal(row, p) for row in everyone)


def _commcomp_run(kind: str, compressor: str, options: dict[str, Any], steps: int) -> dict[str, Any]:
    """Train `steps` steps with commcomp on Horovod; per step: parameters identical on all ranks,
    and the bytes the stats claim next to the bytes of the tensors the codecs say were sent."""
    import horovod.torch as hvd

    import commcomp.horovod as chvd

    model = build(kind)
    opt = chvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.named_parameters(), compressor, **options
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # Horovod's usual start works unchanged
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    rank, n = hvd.rank(), hvd.size()
    log: list[tuple[int, int, bool]] = []

    def after() -> None:
        log.append((opt.stats.last.bytes_sent, expected_bytes(opt, model, n), _identical_everywhere(model)))

    train(model, opt, rank, range(steps), after)
    return {"params": params(model), "log": log, "stats": opt.stats.as_dict()}


def expected_bytes(opt: Any, model: nn.Module, n: int) -> int:
    """What the last step should have handed to Horovod, from the codec shapes (not from the stats)."""
    state = opt.comm_state
    step = state.step - 1
    total = 16 if step == 0 else 0  # the options check: an all-gathered int64 pair
    tracked = getattr(state, "basis", None) == "tracked" and step >= state.warmup_steps
    for name, p in model.named_parameters():
        if tracked:  # float32: one exchange, C_n and Q_n + leftovers + N flags + N checksum slots (or the
            # raw gradient + N flags); two, the coefficients + leftovers (or the raw gradient) + N flags
            layer = state.layers.get(name)
            one = state.exchanges == 1
            payload = 0 if layer is None else (layer.plan.S + (layer.plan.K if one else 0)) * layer.d
            values = p.numel() if layer is None else payload  # S K is the whole layer
            total += 4 * (values + n + (n if one and layer is not None else 0))
        elif hasattr(state, "codecs"):  # GradiVeQ: coefficients + leftovers + N flags, float32
            codec = state.codecs.get(name)
            compressing = state.schedule is not None and state.schedule.phase(step) == "compress"
            if codec is not None and compressing and codec.basis is not None:
                values = codec.plan.S * codec.d + codec.plan.numel - codec.plan.S * codec.plan.K
            else:
                values = p.numel()
            total += 4 * (values + n)
        else:  # a quantizer: its payload + one flag byte (all-gathered) or N flags (summed)
            q = state.quantizer
            fresh = quantizers.get(q.name, **q.options())  # compressing with `q` would draw its random numbers
            total += fresh.compress(torch.zeros_like(p)).nbytes + (4 * n if q.linear else 1)
    if tracked and state.exchanges == 2:  # the basis updates K*d per compressed layer and 4 checksum bytes per rank
        total += 4 * (sum(t.plan.K * t.d for t in state.layers.values() if t is not None) + 4 * n)
    if getattr(state, "schedule", None) is not None and state.schedule.refit(step):
        codecs = [c for c in state.codecs.values() if c is not None and c.basis is not None]
        total += 8  # the float64 checksum every rank all-gathers
        if hvd_rank() == state.fitted.src_rank:  # the broadcast of d (int64) and energies + U + mu (float32)
            total += 8 * len(codecs) + 4 * (len(codecs) + sum(c.plan.K * (c.d + 1) for c in codecs))
    return total


def hvd_rank() -> int:
    import horovod.torch as hvd

    return hvd.rank()


def _checkpoint_run(steps: int, cut: int, outdir: Path) -> dict[str, Any]:
    """`cut` steps, save (model + optimizer + compression state), load into fresh objects, the rest."""
    import horovod.torch as hvd

    import commcomp.horovod as chvd

    rank = hvd.rank()
    model = build("conv")
    opt = chvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.named_parameters(), "gradiveq", **GRADIVEQ
    )
    train(model, opt, rank, range(cut), lambda: None)
    path = outdir / f"ckpt-rank{rank}.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    model = build("conv")
    opt = chvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.named_parameters(), "gradiveq", **GRADIVEQ
    )
    ckpt = torch.load(path, weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train(model, opt, rank, range(cut, steps), lambda: None)
    return {"params": params(model), "step": opt.comm_state.step}


def _error_runs() -> dict[str, str]:
    """Each bad input, with the message every rank got."""
    import horovod.torch as hvd

    import commcomp.horovod as chvd

    rank = hvd.rank()
    out: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            out[name] = "no error"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"

    def nan_step() -> None:
        model = build("conv")
        opt = chvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "gradiveq", nonfinite="raise"
        )
        x, y = batch(rank, 0)
        if rank == 1:
            x[0, 0, 0] = float("nan")
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def mismatched() -> None:
        model = build("conv")
        opt = chvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "qsgd", bits=4 + rank
        )
        x, y = batch(rank, 0)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def after_errors() -> None:  # Horovod still works after the raises above
        model = build("conv")
        opt = chvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), "fp16")
        train(model, opt, rank, range(2), lambda: None)
        if not _identical_everywhere(model):
            raise RuntimeError("ranks differ")

    sgd = torch.optim.SGD(build("conv").parameters(), lr=0.1)
    attempt("nan", nan_step)
    attempt("mismatch", mismatched)
    attempt("unknown_compressor", lambda: chvd.DistributedOptimizer(sgd, [], "nope"))
    attempt("unknown_option", lambda: chvd.DistributedOptimizer(sgd, [], "gradiveq", energy=0.1))
    attempt("unknown_quantizer_option", lambda: chvd.DistributedOptimizer(sgd, [], "qsgd", levels=3))
    attempt("no_names", lambda: chvd.DistributedOptimizer(sgd, None, "gradiveq"))
    attempt("nonlinear_compressor", lambda: chvd.QuantizerCompressor("topk"))
    attempt("int_tensor", lambda: chvd.Compression.fp16.compress(torch.arange(4)))
    attempt("after_errors", after_errors)
    return out


def _plain_horovod_run() -> dict[str, Any]:
    """hvd.DistributedOptimizer with commcomp's fp16 compressor next to Horovod fp32."""
    import horovod.torch as hvd

    import commcomp.horovod as chvd

    rank = hvd.rank()
    out = {}
    for name, compression in (("fp32", hvd.Compression.none), ("fp16", chvd.Compression.fp16)):
        model = build("conv")
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05),
            named_parameters=model.named_parameters(),
            compression=compression,
        )
        train(model, opt, rank, range(4), lambda: None)
        out[name] = (params(model), _identical_everywhere(model))
    return out


def _pqasgd_run(steps: int) -> dict[str, Any]:
    import horovod.torch as hvd

    from commcomp.horovod import HorovodCollectives
    from commcomp.pqasgd import PQASGD

    model = build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = PQASGD(model, opt, period=2, quantizer="qsgd", collectives=HorovodCollectives(), **QSGD)
    train(model, opt, hvd.rank(), range(steps), lambda: None)
    return {"params": params(model), "stats": avg.stats.as_dict()}


def suite(outdir: Path) -> dict[str, Any]:
    parts: dict[str, Callable[[], Any]] = {
        "gradiveq": lambda: _commcomp_run("conv", "gradiveq", GRADIVEQ, PARITY_STEPS),
        "gradiveq_two": lambda: _commcomp_run("conv", "gradiveq", GRADIVEQ_TWO, PARITY_STEPS),
        "gradiveq_fitted": lambda: _commcomp_run("conv", "gradiveq", GRADIVEQ_FITTED, PARITY_STEPS),
        "qsgd": lambda: _commcomp_run("mlp", "qsgd", QSGD, PARITY_STEPS),
        "topk_ef": lambda: _commcomp_run("conv", "topk", dict(ratio=0.05, error_feedback=True), 4),
        "checkpoint": lambda: _checkpoint_run(PARITY_STEPS, 6, outdir),
        "plain": _plain_horovod_run,
        "pqasgd": lambda: _pqasgd_run(PARITY_STEPS),
        "errors": _error_runs,
    }
    out: dict[str, Any] = {"seconds": {}}
    for name, fn in parts.items():
        start = time.perf_counter()
        out[name] = fn()
        out["seconds"][name] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------- convergence on MNIST-1D

CONVERGENCE = dict(steps=1500, batch=32, lr=0.05)
# The DDP hook's convergence test setting (tests/test_gradiveq.py): GradiVeQ's default options.
CONVERGENCE_GRADIVEQ: dict[str, Any] = {}


def convergence(outdir: Path) -> dict[str, Any]:
    """MNIST-1D, CNN1D, SGD with momentum and a cosine schedule: Horovod fp32 and GradiVeQ through
    commcomp.horovod, same seeds."""
    import horovod.torch as hvd

    import commcomp.horovod as chvd
    from benchmarks.data import CNN1D, accuracy, load_mnist1d, shard

    del outdir
    rank, n = hvd.rank(), hvd.size()
    x, y, xt, yt = load_mnist1d()
    xs, ys = shard(x, y, rank, n)
    steps = CONVERGENCE["steps"]
    out = {}
    for method in ("horovod-fp32", "gradiveq"):
        torch.manual_seed(0)
        model = CNN1D()
        sgd = torch.optim.SGD(model.parameters(), lr=CONVERGENCE["lr"], momentum=0.9)
        options = CONVERGENCE_GRADIVEQ if method == "gradiveq" else {}
        if method == "horovod-fp32":  # Horovod's own optimizer, uncompressed
            opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters())
        else:
            opt = chvd.DistributedOptimizer(sgd, model.named_parameters(), method, **options)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, steps)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (CONVERGENCE["batch"],), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
            schedule.step()
        stats = opt.stats.as_dict() if method == "gradiveq" else None  # Horovod's own keeps none
        out[method] = {"accuracy": accuracy(model, xt, yt), "identical": _identical_everywhere(model), "stats": stats}
    return out


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {"suite": suite, "convergence": convergence}


def main() -> None:
    scenario, outdir = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import horovod.torch as hvd

    hvd.init()
    result = SCENARIOS[scenario](outdir)
    torch.save(result, outdir / f"{scenario}-rank{hvd.rank()}.pt")
    hvd.shutdown()


if __name__ == "__main__":
    main()
