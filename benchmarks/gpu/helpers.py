"""Shared helpers: timing (CUDA events), precision and config pinning, error measures, guarded checks."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gpu.record import Run
from gpu.settings import LINEAR_KERNELS, TOLERANCE


def sync(run: Run) -> None:
    if run.cuda:
        torch.cuda.synchronize(run.device)


def bench(run: Run, fn: Callable[[], Any]) -> float:
    """Median ms of ``fn`` after warm-up: CUDA events per call on GPU, ``perf_counter`` on CPU."""
    s = run.sizes
    for _ in range(s.warmup):
        fn()
    sync(run)
    t = time.perf_counter()
    fn()
    sync(run)
    reps = max(2, min(s.max_reps, math.ceil(s.min_time_s / max(time.perf_counter() - t, 1e-6))))
    times = []
    if run.cuda:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(run.device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def first_call_s(run: Run, fn: Callable[[], Any]) -> float:
    """Wall seconds of one synchronized call (includes compiling and autotuning when it is the first)."""
    sync(run)
    t = time.perf_counter()
    fn()
    sync(run)
    return time.perf_counter() - t


@contextlib.contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(level)``, which also sets ``cuda.matmul.allow_tf32``."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def pinned_configs(la: Any, index: int) -> Iterator[str]:
    """Run the autotuned linear_act kernels with only ``configs[index]`` (no autotuning); yields its name."""
    saved = []
    try:
        for name in LINEAR_KERNELS:
            kernel = getattr(la, name)
            saved.append((kernel, kernel.configs))
            kernel.configs = [kernel.configs[index]]
        cfg = saved[0][0].configs[0]
        yield f"{cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
    finally:
        for kernel, configs in saved:
            kernel.configs = configs


def rel_rms(out: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """``‖out − ref‖ / ‖ref‖`` in fp64 (or ``/ scale``); 0-dim tensors give the relative error."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item() if scale is None else scale
    return num / den if den > 0 else num


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bitwise comparisons (NaN included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def shape_str(**dims: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items())


def randn(run: Run, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device=run.device)).to(dtype)


def compare(
    run: Run,
    section: str,
    name: str,
    shape: str,
    prec: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    scale: float | None = None,
    **extra: Any,
) -> None:
    run.check(
        section,
        name,
        shape,
        prec,
        rel_rms(out, ref, scale),
        TOLERANCE[prec],
        metric="rel_rms" if scale is None else "abs_err/scale",
        max_abs_error=max_abs(out, ref),
        **extra,
    )


def guarded(
    run: Run,
    section: str,
    name: str,
    shape: str,
    prec: str,
    fn: Callable[[], None],
    infeasible_ok: bool = False,
) -> None:
    """Run one check; an exception becomes a failed check with its traceback.

    With ``infeasible_ok`` (a pinned config), Triton's ``OutOfResources`` (the tiles need more
    shared memory than the device has; the autotuner skips such configs too) is a skip instead.
    """
    try:
        fn()
    except Exception as e:
        if infeasible_ok and type(e).__name__ == "OutOfResources":
            run.skip(section, f"{name}[{shape},{prec}]", f"pinned config does not fit the device: {e}")
        else:
            run.check_raised(section, name, shape, prec)


def free_memory(run: Run) -> None:
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
