"""The methods the training benchmark compares, each set up the same way on one rank.

`setup(name, net, options)` wraps a freshly built network for one method and returns a `Setup`:
the module to train, a hook to call after `optimizer.step()`, cumulative communication counters and
the model to evaluate. Bytes are always those of the tensors handed to collectives by this rank:
commcomp methods report them in `state.stats`; PyTorch's hooks are counted by `counting.py`; plain
DDP hands every gradient to its all-reduce once per step, so it sends exactly the gradient bytes.

Methods that are not (yet) installed are reported by `unavailable(name)` and skipped by the worker.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp

__all__ = [
    "METHODS",
    "Counters",
    "MakeOptimizer",
    "MethodSpec",
    "Setup",
    "grad_bytes",
    "gradiveq_options",
    "plan_record",
    "registered",
    "setup",
    "stats_counters",
    "unavailable",
]


@dataclass
class Counters:
    """Cumulative over the steps so far on this rank."""

    bytes_sent: int = 0
    dense_bytes: int = 0
    encode_seconds: float = float("nan")  # nan: the method does not expose its encode/decode time
    decode_seconds: float = float("nan")


MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class Setup:
    model: nn.Module  # what forward/backward runs through
    optimizer: torch.optim.Optimizer
    counters: Callable[[], Counters]
    after_step: Callable[[], None] = lambda: None  # called after optimizer.step()
    consensus: bool = False  # ranks hold different models: evaluate their average
    stack: ExitStack = field(default_factory=ExitStack)  # undone when the method is finished
    stepping: Callable[[], AbstractContextManager[Any]] = nullcontext  # entered around each training step
    info: dict[str, Any] = field(default_factory=dict)
    final: Callable[[], dict[str, Any]] = dict  # after the last step, on every rank (may run collectives)


@dataclass(frozen=True)
class MethodSpec:
    label: str  # what the table shows
    build: Callable[[nn.Module, dict[str, Any], MakeOptimizer], Setup]
    requires: str = ""  # "module" or "module:name" that must import/exist, else skipped
    refuses: Callable[[], str | None] = lambda: None  # why it cannot run in this process group, or None


def grad_bytes(net: nn.Module) -> int:
    """Bytes of all trainable parameters' gradients (what an uncompressed all-reduce is handed)."""
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)


def _ddp(net: nn.Module, **kwargs: Any) -> DDP:
    device_ids = [net_device(net)] if net_device(net).type == "cuda" else None
    return DDP(net, device_ids=device_ids, **kwargs)


def net_device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


# ----- plain DDP and PyTorch's hooks -----


def _fp32(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
    model, dense = _ddp(net), grad_bytes(net)
    c = Counters(encode_seconds=0.0, decode_seconds=0.0)

    def count() -> None:  # DDP's reducer all-reduces every gradient byte once per step
        c.bytes_sent += dense
        c.dense_bytes += dense

    return Setup(model, make_opt(model.parameters()), lambda: replace(c), after_step=count)


TorchHook = tuple[Any, Callable[..., Any], dict[str, Any]]  # (hook state, hook, info)


def _timed(hook: Callable[..., Any], seconds: list[float]) -> Callable[..., Any]:
    """`hook`, adding the time spent in its body (before it returns its future) to seconds[0]."""

    def timed(state, bucket):  # no annotations: DDP checks that `bucket` is annotated GradBucket or not at all
        start = time.perf_counter()
        fut = hook(state, bucket)
        seconds[0] += time.perf_counter() - start
        return fut

    return timed


def _torch_hook(hook_modules: tuple[str, ...], make: Callable[[dict[str, Any]], TorchHook], **ddp_kwargs: Any):
    """A PyTorch hook from torch.distributed.algorithms.ddp_comm_hooks, with the collectives issued
    from `hook_modules` counted (PowerSGD's plain all-reduce steps go through default_hooks) and the
    time in the hook's body reported as encode time. Its callbacks, which decode and, for PowerSGD,
    also wait for communication, cannot be told apart: decode is not reported."""

    def build(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
        from benchmarks.counting import CountingDist, count_collectives

        modules = [importlib.import_module(f"torch.distributed.algorithms.ddp_comm_hooks.{m}") for m in hook_modules]
        model, dense, steps, body = _ddp(net, **ddp_kwargs), grad_bytes(net), [0], [0.0]
        state, hook, info = make(options)
        model.register_comm_hook(state, _timed(hook, body))

        def counters() -> Counters:
            return Counters(counter.bytes_sent, dense * steps[0], encode_seconds=body[0])

        s = Setup(model, make_opt(model.parameters()), counters, info={**info, "encode_seconds": "hook body only"})
        counter = CountingDist()
        # installed around each step only: the methods train side by side, each its own steps
        s.stepping = partial(count_collectives, *modules, counter=counter)

        def step() -> None:
            steps[0] += 1

        s.after_step = step
        return s

    return build


def _fp16_hook(options: dict[str, Any]) -> TorchHook:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return None, default_hooks.fp16_compress_hook, {}


def _bf16_hook(options: dict[str, Any]) -> TorchHook:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return None, default_hooks.bf16_compress_hook, {}


def _needs_nccl() -> str | None:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return None
    return "DDP accepts PyTorch's bf16_compress_hook only with CUDA 11+ and NCCL 2.10+; it refuses gloo/CPU"


def _powersgd_hook(options: dict[str, Any], rank: int = 1) -> TorchHook:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    start = max(int(options.get("powersgd_start") or 10), 2)  # PyTorch requires > 1 with error feedback
    state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start)
    return state, ps.powerSGD_hook, {"matrix_approximation_rank": rank, "start_powerSGD_iter": start, "buckets": 1}


def _powersgd(rank: int) -> MethodSpec:
    """PyTorch's powerSGD_hook at `rank`, error feedback and warm start on (its defaults), in ONE
    bucket: with several buckets in flight it issues its collectives from callbacks in different
    orders on different ranks, which crashes on gloo."""
    hook = _torch_hook(("default_hooks", "powerSGD_hook"), partial(_powersgd_hook, rank=rank), bucket_cap_mb=1 << 14)
    return MethodSpec(f"PyTorch powerSGD_hook rank {rank}", hook)


# ----- commcomp -----


def stats_counters(stats: Any) -> Callable[[], Counters]:
    def counters() -> Counters:
        t = stats.total
        return Counters(t.bytes_sent, t.dense_bytes, t.encode_seconds, t.decode_seconds)

    return counters


def _commcomp(
    method: str,
    fixed: dict[str, Any] | None = None,
    from_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[nn.Module, dict[str, Any], MakeOptimizer], Setup]:
    """`commcomp.register(ddp_model, method, ...)`."""

    def build(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
        model = _ddp(net)
        kwargs = {**(fixed or {}), **(from_options(options) if from_options else {})}
        state = commcomp.register(model, method, **kwargs)
        s = Setup(model, make_opt(model.parameters()), stats_counters(state.stats), info={"options": kwargs})
        if callable(getattr(state, "plan", None)):
            s.final = partial(plan_record, state)
        return s

    return build


def plan_record(state: Any) -> dict[str, Any]:
    """What a method that plans its own compression ("auto") decided: `state.plan()` as it stands
    after the last step, and the most time any rank spent measuring and planning (the plan's
    `overhead_seconds` is this rank's; one all-reduce, outside the timed steps, takes the maximum)."""
    plan = state.plan()
    overhead = torch.tensor([float(plan.get("overhead_seconds", 0.0))], dtype=torch.float64)
    dist.all_reduce(overhead, op=dist.ReduceOp.MAX)
    return {"plan": plan, "overhead_seconds_max": float(overhead[0])}


def registered(label: str, method: str, **options: Any) -> MethodSpec:
    """A row for `commcomp.register(ddp_model, method, **options)`, skipped while commcomp has no
    method of that name."""
    return MethodSpec(label, _commcomp(method, options), requires=f"commcomp:{method}")


def _gossip(algorithm: str, **kwargs: Any):
    """A `commcomp.gossip` optimizer wrapper around the plain model (no DDP): its step() is the
    local step plus the exchange with the neighbours."""

    def build(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
        from commcomp import gossip

        algo = gossip.get(algorithm)(net, make_opt(net.parameters()), **kwargs)
        return Setup(net, algo, stats_counters(algo.stats), consensus=True, info={"options": kwargs})  # type: ignore[arg-type]

    return build


def gradiveq_options(options: dict[str, Any]) -> dict[str, Any]:
    """GradiVeQ's keyword arguments from the "gradiveq" option, 'name=value,...' (values read as int,
    float, true/false/none or else kept as text); none: its defaults."""
    out: dict[str, Any] = {}
    for item in filter(None, (options.get("gradiveq") or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"GradiVeQ option {item!r} is not name=value")
        out[key.strip()] = _value(text.strip())
    return out


def _value(text: str) -> Any:
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _pqasgd(net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
    from commcomp.pqasgd import PQASGD

    opt = make_opt(net.parameters())
    kwargs = {"period": 4, "quantizer": "qsgd", "bits": 4}
    avg = PQASGD(net, **kwargs)  # type: ignore[arg-type]
    s = Setup(net, opt, stats_counters(avg.stats), after_step=avg.step, consensus=True, info={"options": kwargs})
    s.stack.callback(avg.close)
    return s


# One line per row: a commcomp method registered under a new name is one more `registered(...)` line.
METHODS: dict[str, MethodSpec] = {
    "fp32": MethodSpec("DDP fp32", _fp32),
    "torch-fp16": MethodSpec("PyTorch fp16_compress_hook", _torch_hook(("default_hooks",), _fp16_hook)),
    "torch-bf16": MethodSpec(
        "PyTorch bf16_compress_hook", _torch_hook(("default_hooks",), _bf16_hook), refuses=_needs_nccl
    ),
    "torch-powersgd-r1": _powersgd(1),
    "torch-powersgd-r4": _powersgd(4),
    "torch-powersgd-r8": _powersgd(8),
    "gradiveq": MethodSpec("commcomp GradiVeQ", _commcomp("gradiveq", from_options=gradiveq_options)),
    "gradiveq-2x": MethodSpec(
        "commcomp GradiVeQ, two exchanges", _commcomp("gradiveq", {"exchanges": 2}, from_options=gradiveq_options)
    ),
    "fp16": registered("commcomp fp16", "fp16"),
    "bf16": registered("commcomp bf16", "bf16"),
    "qsgd4": registered("commcomp QSGD 4-bit", "qsgd", bits=4),
    "qsgd4-ar": registered("commcomp QSGD 4-bit, all-reduced", "qsgd_ar", bits=4),
    "sign-ar": registered("commcomp sign, majority vote (all-reduced)", "sign_ar"),
    "topk1": registered("commcomp top-1% + EF", "topk", ratio=0.01, error_feedback=True),
    "sign": registered("commcomp sign + EF", "sign", error_feedback=True),
    "randk1": registered(
        "commcomp random-1% (shared seed, all-reduce) + EF", "randk", ratio=0.01, rescale=False, error_feedback=True
    ),
    "auto": registered("commcomp auto", "auto"),
    "pqasgd": MethodSpec("commcomp PQASGD p=4 QSGD 4-bit", _pqasgd, requires="commcomp.pqasgd"),
    "choco": MethodSpec(
        "commcomp CHOCO-SGD sign, ring",
        _gossip("choco", topology="ring", quantizer="sign", consensus_step=0.4),
        requires="commcomp.gossip",
    ),
    "dcd": MethodSpec(
        "commcomp DCD-PSGD QSGD 8-bit, ring",
        _gossip("dcd", topology="ring", quantizer="qsgd", bits=8),
        requires="commcomp.gossip",
    ),
    "choco-qsgd4": MethodSpec(
        "commcomp CHOCO-SGD QSGD 4-bit, ring",
        _gossip("choco", topology="ring", quantizer="qsgd", bits=4, consensus_step=0.4),
        requires="commcomp.gossip",
    ),
    "ecd": MethodSpec(
        "commcomp ECD-PSGD QSGD 8-bit, ring",
        _gossip("ecd", topology="ring", quantizer="qsgd", bits=8),
        requires="commcomp.gossip",
    ),
    "dpsgd": MethodSpec(
        "commcomp D-PSGD (uncompressed gossip), ring",
        _gossip("dpsgd", topology="ring"),
        requires="commcomp.gossip",
    ),
}


def unavailable(name: str) -> str | None:
    """Why method `name` cannot run here, or None if it can."""
    if name not in METHODS:
        return f"unknown method {name!r}; valid names: {', '.join(METHODS)}"
    req = METHODS[name].requires
    if not req:
        return METHODS[name].refuses()
    module, _, member = req.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return f"{module} is not available ({e})"
    names = getattr(mod, "method_names", None) or getattr(mod, "names", None)
    if member and (names is None or member not in names()):
        return f"{module} has no method {member!r} yet"
    return METHODS[name].refuses()


def setup(name: str, net: nn.Module, options: dict[str, Any], make_opt: MakeOptimizer) -> Setup:
    """Wrap `net` (already on its device, same initial weights on every rank) for method `name`;
    `make_opt(parameters)` builds the optimizer."""
    why = unavailable(name)
    if why:
        raise ValueError(why)
    dist.barrier()
    return METHODS[name].build(net, options, make_opt)
