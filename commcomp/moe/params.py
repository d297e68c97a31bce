"""Expert parameters: how they are marked, found, and kept out of data-parallel averaging.

Each expert lives on one rank only, so averaging its gradient with the other ranks' (different)
experts would be wrong. `MoE` marks every expert parameter with `p.commcomp_expert = True` and its
expert container with `module.commcomp_experts = True` (whose buffers are expert state too).

With DistributedDataParallel on the rest of the model::

    model = build_model()                      # contains commcomp.moe.MoE layers
    ddp_ignore_experts(model)                  # before wrapping
    ddp = DistributedDataParallel(model)       # averages (and broadcasts) only dense parameters
    ...
    loss.backward()
    scale_expert_grads(model, 1 / world_size)  # see below
    optimizer.step()

Why the scaling: DDP averages dense gradients over ranks, i.e. it trains the mean of the ranks'
losses. An expert's gradient arrives already summed over the tokens of every rank (they were
dispatched to it), i.e. the gradient of the *sum* of the ranks' losses. Dividing it by the world
size makes every parameter follow the same objective, the one a single process would train on the
global batch.
"""

from __future__ import annotations

from torch import nn

from commcomp.shims.torch_internals import ddp_ignored_names, set_ddp_ignored_names

__all__ = [
    "ddp_ignore_experts",
    "dense_parameters",
    "expert_names",
    "expert_parameters",
    "is_expert_parameter",
    "mark_experts",
    "scale_expert_grads",
]

PARAM_FLAG = "commcomp_expert"
MODULE_FLAG = "commcomp_experts"


def mark_experts(module: nn.Module) -> None:
    """Mark all parameters (and, through the module flag, buffers) of `module` as expert state."""
    setattr(module, MODULE_FLAG, True)
    for p in module.parameters():
        setattr(p, PARAM_FLAG, True)


def is_expert_parameter(p: nn.Parameter) -> bool:
    return bool(getattr(p, PARAM_FLAG, False))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that live on one rank only: optimise them, but never average them across ranks."""
    return [p for p in model.parameters() if is_expert_parameter(p)]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters replicated on every rank (gates, attention, embeddings...): average these."""
    return [p for p in model.parameters() if not is_expert_parameter(p)]


def expert_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the expert parameters and of the buffers inside expert containers."""
    names = [n for n, p in model.named_parameters() if is_expert_parameter(p)]
    for prefix, module in model.named_modules():
        if getattr(module, MODULE_FLAG, False):
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers()]
    return names


def ddp_ignore_experts(model: nn.Module) -> list[str]:
    """Tell DistributedDataParallel to skip expert parameters and buffers; call before wrapping.

    DDP then neither broadcasts them at construction, nor buckets them, nor all-reduces their
    gradients (through DDP's private ignore list: `commcomp.shims.torch_internals`). Names already
    ignored are kept. Returns the names now ignored.
    """
    names = sorted(set(ddp_ignored_names(model)) | set(expert_names(model)))
    set_ddp_ignored_names(model, names)
    return names


def scale_expert_grads(model: nn.Module, factor: float) -> None:
    """Multiply the gradients of expert parameters by `factor` (use 1 / world_size next to DDP)."""
    for p in expert_parameters(model):
        if p.grad is not None:
            p.grad.mul_(factor)
