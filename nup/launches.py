"""Count kernel launches of a training step on the CUDA code path, on CPU (DESIGN.md "Launches").

Run with ``NUP_BACKEND=triton TRITON_INTERPRET=1`` (set before triton is imported): every Triton
kernel launch is counted by a hook on the interpreter's ``run``, every torch op that would launch
a CUDA kernel by a ``TorchDispatchMode`` (views, allocations and metadata ops launch nothing and are
not counted; torch ops the interpreter itself makes are not counted either). Launches per layer
are ``(count(depth_hi) − count(depth_lo)) / (depth_hi − depth_lo)``.

``python -m nup.launches PROVIDER…`` prints ``{provider: {"per_layer": …, "constant": …}}`` as JSON.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that launch no kernel: allocation, views and metadata
_FREE = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "view",
    "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "slice", "select", "unsqueeze",
    "squeeze", "unbind", "split", "split_with_sizes", "lift_fresh", "_to_copy_noop", "unfold", "diagonal",
    "_reshape_alias", "set_", "resize_", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "_local_scalar_dense", "scalar_tensor", "_record_function_enter_new", "_record_function_exit",
}  # fmt: skip


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.torch_ops: list[str] = []
        self.triton: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in _FREE:
            self.torch_ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches() -> Iterator[_Counter]:
    """Count launches inside the block: ``counter.torch_ops`` and ``counter.triton`` (lists of names)."""
    from triton.runtime.interpreter import InterpretedFunction

    counter = _Counter()
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counter.triton.append(self.fn.__name__)
        counter.paused += 1  # the interpreter's own torch ops are host work, not launches
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    try:
        with counter:
            yield counter
    finally:
        InterpretedFunction.run = original


def launches_of(step: Callable[[], None], warmup: int = 2) -> int:
    """Launches of one call of ``step`` after ``warmup`` calls (autotuning and first-step set-up excluded)."""
    for _ in range(warmup):
        step()
    with count_launches() as c:
        step()
    return len(c.torch_ops) + len(c.triton)


def per_layer(build: Callable[[int], Callable[[], None]], depths: tuple[int, int] = (4, 8)) -> dict[str, float]:
    """``{"per_layer", "constant"}`` launches of the steps ``build(depth)`` makes at two depths."""
    lo, hi = depths
    n_lo, n_hi = launches_of(build(lo)), launches_of(build(hi))
    slope = (n_hi - n_lo) / (hi - lo)
    return {"per_layer": slope, "constant": n_lo - slope * lo}


def main(argv: list[str]) -> int:
    """Launches per layer of the benchmark providers ``argv`` (needs a source checkout's ``benchmarks/``)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("NUP_BACKEND") != "triton":
        raise SystemExit("run with NUP_BACKEND=triton TRITON_INTERPRET=1 (the CUDA code path, counted on CPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

    def build(provider: str, depth: int) -> Callable[[], None]:
        return common.build_step(provider, common.StepCase(depth, 1, None, 8), torch.device("cpu")).run

    print(json.dumps({p: per_layer(functools.partial(build, p)) for p in argv}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
