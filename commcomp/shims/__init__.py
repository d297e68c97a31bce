"""The only places commcomp uses private names of its dependencies, one small module per dependency.

- `commcomp.shims.horovod_internals`: Horovod's `_DistributedOptimizer` machinery (imported by
  `commcomp.horovod` only; checks the Horovod version on import).
- `commcomp.shims.torch_internals`: DDP's parameter-ignore list (used by `commcomp.moe`).

Everything else in commcomp uses public APIs only. When a dependency changes, this is where to look.
"""
