"""One prepared GPU check: compile, verify and time every nup kernel and the full step; one JSON out.

Run once on a CUDA machine, from the repository root, with nothing installed beyond torch, triton
and numpy::

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT [--budget-s 270] [--only a,b] [--skip c]

Sections, in order (``--only`` / ``--skip`` take these names):

- ``compile``: every kernel once at a tiny shape, with its first-call (compile) time.
- ``correctness_fp32`` / ``_tf32`` / ``_bf16``: every kernel against ``nup_kernels.reference``
  (computed in fp32 with TF32 off) at awkward and aligned shapes; tolerances in ``TOLERANCE``.
- ``fused_step``: NuMLP + NuP(fused=True) against the drop-in step over 5 steps (both update
  paths), and bitwise repeatability of two runs.
- ``host_sync``: ``torch.cuda.set_sync_debug_mode("error")`` around ``opt.step()`` (drop-in) and
  around ``backward(); opt.step()`` (fused).
- ``timing_memory``, ``timing_step``, ``timing_step_compiled``, ``timing_linear``,
  ``timing_step_bf16``: CUDA-event medians against the baselines (``settings.step_variants``),
  with DESIGN.md's targets as pass/fail booleans. No timing item starts once ``--budget-s``
  seconds have passed; it is listed under ``skipped`` instead.

The correctness sections pin the autotuned matmul kernels to one config (the smallest; the
largest too at an awkward shape under TF32 and bf16): autotuning builds all seven configs of
every specialization, tens of seconds per kernel in fp32 without TF32. The timing sections
autotune as in production and check those outputs as well.

``--tiny`` runs every section at tiny shapes with 1-2 repeats. Without CUDA it runs the kernels
in Triton's interpreter (``TRITON_INTERPRET=1``, ``NUP_BACKEND=triton``, set here when unset):
timings are then no performance figures (``timings_meaningful: false``, no verdicts), and the
TF32, bf16 and host-sync checks are skipped with a reason.

``$OUT/gpu_check.json`` is rewritten atomically after every section and grid point. Exit status:
0 when every check passed and no section raised, 1 otherwise, 2 without CUDA and ``--tiny`` or
for an unknown section name.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

SECTIONS = (
    "compile",
    "correctness_fp32",
    "correctness_tf32",
    "correctness_bf16",
    "fused_step",
    "host_sync",
    "timing_memory",
    "timing_step",
    "timing_step_compiled",
    "timing_linear",
    "timing_step_bf16",
)
#: relative RMS error ``‖out − ref‖ / ‖ref‖`` allowed against the reference in fp32 with TF32 off
TOLERANCE = {"fp32": 2e-5, "tf32": 5e-3, "bf16": 2e-2}
#: fused step against the drop-in step after 5 steps (displacements ``P − P_0``, statistics)
STEP_TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3}
#: precision -> (dtype, ``torch.set_float32_matmul_precision`` level)
PRECISIONS = {
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
}
#: DESIGN.md's performance targets: (comparison, bound) on the entry's ``ratio``
TARGETS = {
    "fused_vs_plain": ("<=", 1.05),  # fused step ms / plain step ms
    "fused_vs_unfused": (">=", 1.5),  # unfused step ms / fused step ms
    "fused_vs_compiled": (">", 1.0),  # compiled step ms / fused step ms
    "apply_vs_copy": (">=", 0.8),  # achieved GB/s / device copy GB/s
    "linear_vs_cublas": (">=", 0.9),  # kernel TFLOP/s / F.linear (cuBLAS) TFLOP/s
}
STEP_VARIANTS = ("plain", "unfused", "drop_in", "fused")
STEP_VARIANT_DOCS = {
    "plain": "F.linear + ReLU (alpha folded into W), autograd, torch.optim.SGD(fused=True); no statistics",
    "unfused": "the plain forward/backward, then unfused_stats_update: per tensor g.norm(), (g*c).sum(), "
    "c.norm(), p.addcmul_, c.addcmul_",
    "compiled": "the plain forward/backward (eager), then torch.compile(unfused_stats_update)",
    "drop_in": "NuMLP + NuP(fused=False, geometry schedule): Triton linear_act and multi-tensor kernels",
    "fused": "NuMLP + NuP(fused=True, geometry schedule): updates applied inside the backward",
}
LINEAR_KERNELS = ("_linear_act_fwd_kernel", "_linear_act_bwd_dx_kernel", "_linear_act_bwd_dw_kernel")
STAT_KEYS = ("update_norm", "cos", "c_norm", "coherence", "lr", "multiplier", "skipped")


@dataclass(frozen=True)
class Sizes:
    """Shapes and repeat counts; ``(B, n_in, n_out)`` for linear layers."""

    check_shapes: tuple[tuple[int, int, int], ...]  # awkward first, then B = 1, then aligned
    act_shape: tuple[int, int, int]
    mt_shapes: tuple[tuple[int, ...], ...]
    step_check: tuple[int, int, int, int, int]  # in, out, depth, m, batch
    copy_numel: int
    apply_shape: tuple[int, int]  # (n_out, n_in)
    apply_batch: dict[str, int]
    mt_bench: tuple[int, tuple[int, int]]  # count, shape
    elem_shape: tuple[int, int]
    linear_shapes: tuple[tuple[int, int, int], ...]
    gram_shapes: tuple[tuple[int, int, int], ...]
    step_io: tuple[int, int]
    step_m: int
    step_max_width: int
    depths: tuple[int, ...]
    batches: tuple[int, ...]
    bf16_depths: tuple[int, ...]
    warmup: int
    max_reps: int
    min_time_s: float  # time each measurement at least this long (within max_reps)


GPU_SIZES = Sizes(
    check_shapes=((300, 1000, 333), (1, 17, 33), (4096, 1024, 4096)),
    act_shape=(33, 100, 70),
    mt_shapes=((1,), (17,), (33, 17), (1000, 33), (4096,), (1024, 4096)),
    step_check=(33, 10, 4, 17, 33),
    copy_numel=1 << 28,
    apply_shape=(8192, 8192),
    apply_batch={"fp32": 32, "bf16": 128},
    mt_bench=(16, (4096, 4096)),
    elem_shape=(8192, 8192),
    linear_shapes=((4096, 4096, 4096), (8192, 8192, 8192)),
    gram_shapes=((32, 8192, 8192), (256, 8192, 8192)),
    step_io=(512, 16),
    step_m=512,
    step_max_width=2048,
    depths=(4, 16, 64),
    batches=(32, 256, 2048),
    bf16_depths=(16,),
    warmup=2,
    max_reps=20,
    min_time_s=0.2,
)
TINY_SIZES = Sizes(
    check_shapes=((33, 40, 20), (1, 17, 33), (64, 32, 48)),
    act_shape=(9, 20, 12),
    mt_shapes=((1,), (17,), (33, 17), (5000,)),
    step_check=(7, 3, 3, 2, 17),
    copy_numel=1 << 16,
    apply_shape=(48, 40),
    apply_batch={"fp32": 4, "bf16": 4},
    mt_bench=(3, (40, 33)),
    elem_shape=(40, 48),
    linear_shapes=((32, 48, 40),),
    gram_shapes=((8, 48, 40),),
    step_io=(16, 8),
    step_m=4,
    step_max_width=32,
    depths=(2, 3),
    batches=(4, 72),
    bf16_depths=(2,),
    warmup=0,
    max_reps=2,
    min_time_s=0.0,
)


# ------------------------------------------------------------------------------------------ results


def _jsonable(value: Any) -> Any:
    """Non-finite floats become strings, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(x: Any, spec: str = "9.4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{str(x):>9}"


class Run:
    """State of one run: device, sizes, time budget and the JSON being written."""

    def __init__(self, args: argparse.Namespace, device: torch.device, kernels: SimpleNamespace) -> None:
        self.t0 = time.perf_counter()
        self.device, self.k, self.tiny = device, kernels, args.tiny
        self.cuda = device.type == "cuda"
        self.sizes = TINY_SIZES if args.tiny else GPU_SIZES
        self.budget_s = args.budget_s
        self.path = os.path.join(args.out, "gpu_check.json")
        self.steps: dict[tuple[str, int, int], dict[str, Any]] = {}  # (dtype, depth, batch) -> step results
        self.copy_gbps: float | None = None
        meaningful = self.cuda and not self.tiny
        self.data: dict[str, Any] = {
            "schema": 1,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "complete": False,
            "mode": ("tiny-" if self.tiny else "") + ("cuda" if self.cuda else "cpu-interpreter"),
            "timings_meaningful": meaningful,
            "timing_note": None
            if meaningful
            else (
                "tiny shapes"
                + ("" if self.cuda else " in Triton's CPU interpreter")
                + ": not performance figures"
            ),
            "env": environment(device),
            "settings": {
                "budget_s": self.budget_s,
                "tolerance_rel_rms": TOLERANCE,
                "step_tolerance": STEP_TOLERANCE,
                "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
                "sizes": self.sizes.__dict__,
                "step_variants": dict(STEP_VARIANT_DOCS),
            },
            "sections": {},
            "checks": [],
            "timings": [],
            "skipped": [],
        }

    # time budget -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget_reason(self) -> str | None:
        """Why a timing item must not start, or None."""
        if self.elapsed() > self.budget_s:
            return f"time budget --budget-s {self.budget_s:g} exceeded ({self.elapsed():.0f} s elapsed)"
        return None

    # records -----------------------------------------------------------------------------
    def check(
        self,
        section: str,
        name: str,
        shape: str,
        dtype: str,
        error: float,
        tolerance: float,
        metric: str = "rel_rms",
        **extra: Any,
    ) -> bool:
        error = float(error)
        ok = math.isfinite(error) and error <= tolerance
        self.data["checks"].append(
            dict(
                section=section,
                name=name,
                shape=shape,
                dtype=dtype,
                metric=metric,
                error=error,
                tolerance=tolerance,
                passed=ok,
                **extra,
            )
        )
        if not ok:
            print(
                f"  FAIL {section}/{name} [{shape}, {dtype}]: {metric} {error:.3g} > {tolerance:g}",
                flush=True,
            )
        return ok

    def check_raised(self, section: str, name: str, shape: str, dtype: str) -> None:
        text = traceback.format_exc()
        self.data["checks"].append(
            dict(
                section=section,
                name=name,
                shape=shape,
                dtype=dtype,
                metric="raised",
                error=float("inf"),
                tolerance=0.0,
                passed=False,
                traceback=text,
            )
        )
        print(
            f"  FAIL {section}/{name} [{shape}, {dtype}] raised: {text.strip().splitlines()[-1]}", flush=True
        )

    def timing(
        self, section: str, name: str, shape: str, dtype: str, ms: float | None, **fields: Any
    ) -> dict:
        entry = dict(
            section=section,
            name=name,
            shape=shape,
            dtype=dtype,
            ms=ms,
            baseline=None,
            baseline_ms=None,
            gbps=None,
            tflops=None,
            ratio=None,
            ratio_def=None,
            target=None,
            passed=None,
            meaningful=self.data["timings_meaningful"],
        )
        kind = fields.pop("target_kind", None)
        entry.update(fields)
        if kind is not None and entry["ratio"] is not None:
            op, bound = TARGETS[kind]
            entry["target"] = f"{kind} {op} {bound}"
            verdict = _compare(entry["ratio"], op, bound)
            entry["passed"] = verdict if entry["meaningful"] else None
        self.data["timings"].append(entry)
        print("  " + _timing_line(entry), flush=True)
        return entry

    def skip(self, section: str, name: str, reason: str) -> None:
        self.data["skipped"].append(dict(section=section, name=name, reason=reason))
        print(f"  skip {section}/{name}: {reason}", flush=True)

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(self.data), f, indent=1)
        os.replace(tmp, self.path)


def _compare(x: float, op: str, bound: float) -> bool:
    return {"<=": x <= bound, ">=": x >= bound, ">": x > bound}[op]


def _timing_line(e: dict) -> str:
    verdict = "" if e["passed"] is None else ("PASS" if e["passed"] else "FAIL")
    rate = f"{e['tflops']:.1f} TF/s" if e.get("tflops") else f"{e['gbps']:.0f} GB/s" if e.get("gbps") else ""
    return (
        f"{e['name']:<30} {e['shape']:<24} {e['dtype']:<10} {_fmt(e['ms'], '9.4f')} ms  "
        f"base {_fmt(e['baseline_ms'], '9.4f')}  ratio {_fmt(e['ratio'], '6.3f')}  {rate:>12} "
        f"{e['target'] or '':<26} {verdict}"
    )


def environment(device: torch.device) -> dict[str, Any]:
    import numpy
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "cuda_runtime": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in ("NUP_BACKEND", "TRITON_INTERPRET", "NUP_UPDATE_PATH")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
    else:
        env.update(device="cpu", capability=None)
    return env


# ------------------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------------------ compile


def section_compile(run: Run) -> None:
    """Call every kernel once at a tiny awkward shape, pinned to the smallest matmul config."""
    k, sec = run.k, "compile"
    b, n_in, n_out = 3, 5, 7
    x, w, bias, dy = randn(run, b, n_in), randn(run, n_out, n_in), randn(run, n_out), randn(run, b, n_out)
    saved = torch.relu(0.7 * x @ w.t())
    delta = dy * (saved > 0)
    coef = torch.full((1,), -0.1, device=run.device)

    def apply(**kw: Any) -> torch.Tensor:
        return k.apply.apply_update(w.clone(), randn(run, n_out, n_in), coef, **kw)

    ds = [randn(run, 17), randn(run, 5, 7)]
    cs = [randn(run, 17), randn(run, 5, 7)]
    items = {
        "linear_act_fwd[relu]": lambda: k.la.linear_act_forward(x, w, None, 0.7, 0.0, "relu"),
        "linear_act_fwd[gelu,bias]": lambda: k.la.linear_act_forward(x, w, bias, 0.7, 0.5, "gelu"),
        "linear_act_bwd_dx": lambda: k.la.linear_act_backward_dx(dy, saved, w, 0.7, "relu"),
        "linear_act_bwd_dw": lambda: k.la.linear_act_backward_dw(dy, saved, x, 0.7, "relu"),
        "linear_act_bias_grad": lambda: k.la.linear_act_bias_grad(dy, saved, 0.5, "relu"),
        "activation_delta": lambda: k.la.activation_delta(dy, saved, "relu"),
        "grad_norm_gram": lambda: k.gram.grad_norm_sq_gram(x, delta, 0.7),
        "apply_update[materialized]": lambda: apply(grad=randn(run, n_out, n_in)),
        "apply_update[small_batch]": lambda: apply(x=x, delta=delta, alpha=0.7),
        "apply_update[init]": lambda: apply(grad=randn(run, n_out, n_in), cumulative_is_init=True),
        "multi_tensor_reduce": lambda: k.mt.multi_tensor_reduce(ds, cs),
        "multi_tensor_apply": lambda: k.mt.multi_tensor_apply(
            [d.clone() for d in ds], ds, [c.clone() for c in cs], torch.full((2,), -0.1, device=run.device)
        ),
    }
    shape = shape_str(B=b, n_in=n_in, n_out=n_out)
    with matmul_precision("highest"), pinned_configs(k.la, -1) as config:
        for name, fn in items.items():

            def one(name: str = name, fn: Callable = fn) -> None:
                out: list[Any] = []
                seconds = first_call_s(run, lambda: out.append(fn()))
                tensors = [t for t in _flatten(out) if torch.is_tensor(t) and t.is_floating_point()]
                bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
                run.check(
                    sec,
                    name,
                    shape,
                    "fp32",
                    bad,
                    0,
                    metric="non-finite outputs",
                    compile_s=seconds,
                    config=config if name.startswith("linear_act_") and "grad" not in name else None,
                )

            guarded(run, sec, name, shape, "fp32", one)


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flatten(x)]
    return [obj]


# ------------------------------------------------------------------------------------------ correctness


def check_linear(
    run: Run,
    sec: str,
    prec: str,
    dims: tuple[int, int, int],
    act_name: str,
    bias: bool,
    config: str,
    infeasible_ok: bool = False,
) -> None:
    """linear_act fwd, bwd dx, bwd dw (+ ‖G‖²), bias grad and activation_delta against the reference."""
    k = run.k
    dtype = PRECISIONS[prec][0]
    b, n_in, n_out = dims
    act = k.get_activation(act_name)
    shape = shape_str(B=b, n_in=n_in, n_out=n_out, act=act_name, bias=bias)
    x, w, dy = (
        randn(run, b, n_in, dtype=dtype),
        randn(run, n_out, n_in, dtype=dtype),
        randn(run, b, n_out, dtype=dtype),
    )
    bvec = randn(run, n_out, dtype=dtype) if bias else None
    alpha, bias_scale = 1.3 / math.sqrt(n_in), 0.5
    with matmul_precision("highest"):
        y_ref, h_ref = k.ref.linear_act_forward(x, w, bvec, alpha, bias_scale, act)
        saved = y_ref if act.grad_from_output else h_ref
        delta_ref = k.ref.activation_delta(dy, saved, act, act.grad_from_output)
        dx_ref = k.ref.linear_act_backward_dx(delta_ref, w, alpha)
        g_ref, gsq_ref = k.ref.linear_act_backward_dw(delta_ref, x, alpha)
        db_ref = k.ref.bias_grad(delta_ref, bias_scale)

    def fwd() -> None:
        y, s = k.la.linear_act_forward(x, w, bvec, alpha, bias_scale, act)
        compare(run, sec, "linear_act_fwd.y", shape, prec, y, y_ref, config=config)
        if not act.grad_from_output:
            compare(run, sec, "linear_act_fwd.h", shape, prec, s, h_ref, config=config)

    def dx() -> None:
        out = k.la.linear_act_backward_dx(dy, saved, w, alpha, act, out_dtype=dtype)
        compare(run, sec, "linear_act_bwd_dx", shape, prec, out, dx_ref, config=config)

    def dw() -> None:
        g, gsq = k.la.linear_act_backward_dw(dy, saved, x, alpha, act)
        compare(run, sec, "linear_act_bwd_dw.G", shape, prec, g, g_ref, config=config)
        compare(run, sec, "linear_act_bwd_dw.norm_sq", shape, prec, gsq, gsq_ref, config=config)

    def db() -> None:
        compare(
            run,
            sec,
            "linear_act_bias_grad",
            shape,
            prec,
            k.la.linear_act_bias_grad(dy, saved, bias_scale, act),
            db_ref,
        )

    def delta() -> None:
        compare(run, sec, "activation_delta", shape, prec, k.la.activation_delta(dy, saved, act), delta_ref)

    for name, fn in (
        ("linear_act_fwd", fwd),
        ("linear_act_bwd_dx", dx),
        ("linear_act_bwd_dw", dw),
        ("linear_act_bias_grad", db),
        ("activation_delta", delta),
    ):
        guarded(run, sec, name, shape, prec, fn, infeasible_ok)


def check_gram(run: Run, sec: str, prec: str, dims: tuple[int, int, int]) -> None:
    k = run.k
    b, n_in, n_out = dims
    x, delta = randn(run, b, n_in, dtype=PRECISIONS[prec][0]), randn(run, b, n_out)
    with matmul_precision("highest"):
        ref = k.ref.grad_norm_sq_gram(x, delta, 0.9)
    compare(
        run,
        sec,
        "grad_norm_gram",
        shape_str(B=b, n_in=n_in, n_out=n_out),
        prec,
        k.gram.grad_norm_sq_gram(x, delta, 0.9),
        ref,
    )


def check_apply(
    run: Run, sec: str, prec: str, dims: tuple[int, int, int], path: str, init: bool = False
) -> None:
    """apply_update on one path: ΔW, the new C and ``⟨ΔW, C_old⟩`` against the reference; then a NaN skip."""
    k = run.k
    dtype = PRECISIONS[prec][0]
    b, n_in, n_out = dims
    shape = shape_str(n_out=n_out, n_in=n_in, B=b, path=path + (",init" if init else ""))
    w, c = randn(run, n_out, n_in, dtype=dtype), randn(run, n_out, n_in, dtype=dtype, scale=0.3)
    x, delta, alpha = randn(run, b, n_in, dtype=dtype), randn(run, b, n_out), 0.9
    with matmul_precision("highest"):
        g = alpha * (delta.t() @ x.float())
    # a step of RMS 0.5 per entry, so ΔW is resolved even in bf16
    coef = (-0.5 * math.sqrt(g.numel()) / torch.linalg.vector_norm(g).clamp_min(1e-30)).reshape(1).float()
    kw = dict(grad=g) if path == "materialized" else dict(x=x, delta=delta, alpha=alpha)
    w1, c1, w2, c2 = w.clone(), c.clone(), w.clone(), c.clone()
    dot = k.apply.apply_update(w1, c1, coef, cumulative_is_init=init, **kw)
    with matmul_precision("highest"):
        dot_ref = k.ref.apply_update(w2, c2, coef.reshape(()), cumulative_is_init=init, **kw)
    dw_ref = w2.double() - w.double()
    compare(run, sec, "apply_update.dW", shape, prec, w1.double() - w.double(), dw_ref)
    compare(run, sec, "apply_update.C", shape, prec, c1, c2)
    c_old = (w.double() - c.double()) if init else c.double()
    scale = (torch.linalg.vector_norm(dw_ref) * torch.linalg.vector_norm(c_old)).item()
    compare(run, sec, "apply_update.dot", shape, prec, dot, dot_ref, scale=scale)
    # a zero coef leaves W and C bit-identical even where G (or δ) holds NaN
    w3, c3 = w.clone(), c.clone()
    bad = dict(kw)
    if path == "materialized":
        bad["grad"] = g.clone().index_fill_(0, torch.tensor([0], device=run.device), float("nan"))
    else:
        bad["delta"] = delta.clone().index_fill_(0, torch.tensor([0], device=run.device), float("nan"))
    k.apply.apply_update(w3, c3, torch.zeros(1, device=run.device), cumulative_is_init=init, **bad)
    changed = int((bits(w3) != bits(w)).sum()) + int((bits(c3) != bits(c)).sum())
    run.check(sec, "apply_update.skip_nan", shape, prec, changed, 0, metric="changed entries")


def check_multi_tensor(run: Run, sec: str, prec: str) -> None:
    """multi_tensor_reduce and multi_tensor_apply over awkward sizes against the reference."""
    k = run.k
    dtype = PRECISIONS[prec][0]
    shapes = run.sizes.mt_shapes
    shape = "tensors=" + "|".join("x".join(map(str, s)) for s in shapes)
    ds = [randn(run, *s, dtype=dtype) for s in shapes]
    cs = [randn(run, *s, dtype=dtype, scale=0.5) for s in shapes]
    ps = [randn(run, *s, dtype=dtype) for s in shapes]

    def reduce() -> None:
        out = k.mt.multi_tensor_reduce(ds, cs)
        with matmul_precision("highest"):
            ref = k.ref.multi_tensor_reduce(ds, cs)
        d_sq, c_sq = ref[0].double(), ref[2].double()
        for i, name, scale in ((0, "d_sq", d_sq), (1, "dot", (d_sq * c_sq).sqrt()), (2, "c_sq", c_sq)):
            err = ((out[i].double() - ref[i].double()).abs() / scale).max().item()
            run.check(
                sec,
                f"multi_tensor_reduce.{name}",
                shape,
                prec,
                err,
                TOLERANCE[prec],
                metric="max_i |err_i| / " + ("‖D_i‖‖C_i‖" if name == "dot" else "ref_i"),
            )

    def apply() -> None:
        numels = torch.tensor([d.numel() for d in ds], device=run.device, dtype=torch.float32)
        coefs = -0.5 * numels.sqrt() / torch.stack([torch.linalg.vector_norm(d.float()) for d in ds])
        coefs[1] = 0.0
        bad = [d.clone() for d in ds]
        bad[1].view(-1)[0] = float("nan")
        p1, c1, p2, c2 = ([t.clone() for t in ts] for ts in (ps, cs, ps, cs))
        k.mt.multi_tensor_apply(p1, bad, c1, coefs)
        k.ref.multi_tensor_apply(p2, bad, c2, coefs)
        flat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
        compare(run, sec, "multi_tensor_apply.dP", shape, prec, flat(p1) - flat(ps), flat(p2) - flat(ps))
        compare(run, sec, "multi_tensor_apply.C", shape, prec, flat(c1), flat(c2))
        changed = int((bits(p1[1]) != bits(ps[1])).sum()) + int((bits(c1[1]) != bits(cs[1])).sum())
        run.check(sec, "multi_tensor_apply.skip_nan", shape, prec, changed, 0, metric="changed entries")

    guarded(run, sec, "multi_tensor_reduce", shape, prec, reduce)
    guarded(run, sec, "multi_tensor_apply", shape, prec, apply)


def section_correctness(run: Run, prec: str) -> None:
    sec, s = f"correctness_{prec}", run.sizes
    level = PRECISIONS[prec][1]
    with matmul_precision(level):
        with pinned_configs(run.k.la, -1) as config:
            for dims in s.check_shapes:
                check_linear(run, sec, prec, dims, "relu", False, config)
            if prec == "fp32":  # every activation code; tanh and gelu with a bias
                for act, bias in (("tanh", True), ("gelu", True), ("silu", False), ("abs", False)):
                    check_linear(run, sec, prec, s.act_shape, act, bias, config)
            for dims in s.check_shapes:
                guarded(
                    run, sec, "grad_norm_gram", str(dims), prec, lambda d=dims: check_gram(run, sec, prec, d)
                )
                for path in ("materialized", "small_batch"):
                    guarded(
                        run,
                        sec,
                        "apply_update",
                        str(dims),
                        prec,
                        lambda d=dims, p=path: check_apply(run, sec, prec, d, p),
                    )
            if prec == "fp32":  # P_0 storage is fp32-only
                guarded(
                    run,
                    sec,
                    "apply_update",
                    "init",
                    prec,
                    lambda: check_apply(run, sec, prec, s.check_shapes[0], "small_batch", init=True),
                )
            check_multi_tensor(run, sec, prec)
        if (
            prec != "fp32" or not run.cuda
        ):  # the largest tiles at the awkward shape (IEEE fp32: too slow to build)
            with pinned_configs(run.k.la, largest_fitting_config(run, PRECISIONS[prec][0])) as config:
                check_linear(run, sec, prec, s.check_shapes[0], "relu", False, config, infeasible_ok=True)


def largest_fitting_config(run: Run, dtype: torch.dtype) -> int:
    """Index of the first (largest-tile) matmul config whose pipelined tiles fit in shared memory.

    Estimate: ``stages·(BM·BK + BK·BN)·itemsize`` against the device's opt-in shared memory per block
    (the dx and dw kernels use the same tile sizes under other names).
    """
    configs = run.k.la._linear_act_fwd_kernel.configs
    if not run.cuda:
        return 0
    props = torch.cuda.get_device_properties(run.device)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    size = torch.finfo(dtype).bits // 8
    for i, c in enumerate(configs):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if c.num_stages * (m * k + k * n) * size <= limit:
            return i
    return len(configs) - 1


# ------------------------------------------------------------------------------------------ fused step


def _nup_model(run: Run, act: str = "relu", bias: bool = False) -> Any:
    n_in, n_out, depth, m, _ = run.sizes.step_check
    torch.manual_seed(0)
    model = run.k.NuMLP(n_in, n_out, depth, m, activation=act, bias=bias, sigma_b2=0.3 if bias else 0.0)
    return model.to(run.device)


def _nup_opt(run: Run, model: torch.nn.Module, fused: bool) -> Any:
    k = run.k
    return k.NuP(
        model.named_parameters(), lr=0.1, schedule=k.make_schedule("geometry"), recompute_every=3, fused=fused
    )


def _data(run: Run, batch: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(batch, n_in, generator=g).to(run.device),
        torch.randint(0, n_out, (batch,), generator=g).to(run.device),
    )


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def check_fused_vs_drop_in(run: Run, prec: str, path: str, act: str, bias: bool) -> None:
    sec = "fused_step"
    n_in, n_out, depth, m, batch = run.sizes.step_check
    shape = shape_str(depth=depth, m=m, B=batch, act=act, bias=bias, path=path)
    with matmul_precision(PRECISIONS[prec][1]), env_var("NUP_UPDATE_PATH", path):
        m1 = _nup_model(run, act, bias)
        m2 = copy.deepcopy(m1)
        o1, o2 = _nup_opt(run, m1, False), _nup_opt(run, m2, True)
        p0 = [p.detach().clone() for p in m1.parameters()]
        x, y = _data(run, batch, n_in, n_out)
        for _ in range(5):
            _train_step(m1, o1, x, y)
            _train_step(m2, o2, x, y)
    tol = STEP_TOLERANCE[prec]
    err = max(rel_rms(q - q0, p - q0) for p, q, q0 in zip(m1.parameters(), m2.parameters(), p0))
    run.check(
        sec, "fused_vs_drop_in.displacement", shape, prec, err, tol, metric="max_tensor rel_rms(P - P_0)"
    )
    v1, v2 = o1.stat_vectors(), o2.stat_vectors()
    for key in STAT_KEYS:
        a, b = v2[key].double(), v1[key].double()
        err = (a - b).abs().max().item() if key in ("cos", "skipped") else rel_rms(a, b)
        run.check(
            sec,
            f"fused_vs_drop_in.{key}",
            shape,
            prec,
            err,
            tol,
            metric="max abs" if key in ("cos", "skipped") else "rel_rms",
        )
    run.check(sec, "fused_vs_drop_in.step_count", shape, prec, abs(v1["step"] - v2["step"]), 0, metric="abs")
    run.check(
        sec,
        "fused_vs_drop_in.no_grad_written",
        shape,
        prec,
        sum(p.grad is not None for p in m2.parameters()),
        0,
        metric="params with .grad",
    )


def check_repeatable(run: Run, fused: bool) -> None:
    sec, name = "fused_step", "bitwise_repeatable." + ("fused" if fused else "drop_in")
    n_in, n_out, depth, m, batch = run.sizes.step_check
    shape = shape_str(depth=depth, m=m, B=batch)
    runs = []
    x, y = _data(run, batch, n_in, n_out)
    for _ in range(2):
        model = _nup_model(run)
        opt = _nup_opt(run, model, fused)
        for _ in range(3):
            _train_step(model, opt, x, y)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.stat_vectors()))
    differ = sum(int((bits(p) != bits(q)).sum()) for p, q in zip(runs[0][0], runs[1][0]))
    differ += sum(int((bits(runs[0][1][k]) != bits(runs[1][1][k])).sum()) for k in STAT_KEYS)
    run.check(sec, name, shape, "fp32", differ, 0, metric="differing entries")


def section_fused_step(run: Run) -> None:
    precs = ["fp32"]
    if run.cuda:
        precs.append("tf32")
    else:
        run.skip("fused_step", "fused_vs_drop_in[tf32]", "TF32 needs CUDA")
    with pinned_configs(run.k.la, -1):
        for prec in precs:
            cases = (("relu", False), ("tanh", True)) if prec == "fp32" else (("relu", False),)
            for path in ("small_batch", "materialized"):
                for act, bias in cases:
                    guarded(
                        run,
                        "fused_step",
                        "fused_vs_drop_in",
                        f"{path},{act}",
                        prec,
                        lambda p=prec, q=path, a=act, b=bias: check_fused_vs_drop_in(run, p, q, a, b),
                    )
        with matmul_precision("highest"):
            for fused in (True, False):
                guarded(
                    run,
                    "fused_step",
                    "bitwise_repeatable",
                    "",
                    "fp32",
                    lambda f=fused: check_repeatable(run, f),
                )


def section_host_sync(run: Run) -> str | None:
    """No host sync inside ``opt.step()`` (drop-in) nor inside ``backward(); opt.step()`` (fused).

    Without CUDA the same steps run with no sync-debug mode, and the section reports itself skipped.
    """
    sec = "host_sync"
    n_in, n_out, _, _, batch = run.sizes.step_check
    x, y = _data(run, batch, n_in, n_out)
    with pinned_configs(run.k.la, -1), matmul_precision("highest"):
        for fused in (False, True):
            name = "no_sync." + ("fused_backward_and_step" if fused else "drop_in_step")

            def one(fused: bool = fused, name: str = name) -> None:
                model = _nup_model(run)
                opt = _nup_opt(run, model, fused)
                for _ in range(2):  # warm-up: compiles, caches the launch tables and scales
                    _train_step(model, opt, x, y)
                sync(run)
                error = None
                for _ in range(3):
                    loss = F.cross_entropy(model(x), y)
                    if not fused:
                        loss.backward()
                    try:
                        with sync_debug(run):
                            if fused:
                                loss.backward()
                            opt.step()
                            opt.stat_vectors()
                    except RuntimeError:
                        error = traceback.format_exc()
                    opt.zero_grad()
                    if error:
                        break
                if run.cuda:
                    run.check(
                        sec,
                        name,
                        shape_str(B=batch),
                        "fp32",
                        0 if error is None else 1,
                        0,
                        metric="host syncs raised",
                        traceback=error,
                    )
                elif error is not None:
                    raise RuntimeError(error)

            guarded(run, sec, name, shape_str(B=batch), "fp32", one)
    return None if run.cuda else "the sync-debug mode needs CUDA (the steps ran, nothing was checked)"


@contextlib.contextmanager
def sync_debug(run: Run) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block (nothing on CPU)."""
    if not run.cuda:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ timing: memory


def apply_bytes(traffic: Any, path: str, n_params: int, w_size: int, c_size: int, g_size: int) -> int:
    """Bytes the apply kernel moves, from ``nup_kernels.traffic``'s pass counts for the whole step.

    The step's W passes include the forward and the dx reads (2) and its G passes the dw write
    (1): those happen outside the apply kernel; the rest is the apply's.
    """
    t = traffic.traffic(n_params, path)
    return n_params * ((t["w"] - 2) * w_size + max(t["g"] - 1, 0) * g_size + t["c"] * c_size)


def section_timing_memory(run: Run) -> None:
    sec, s, k = "timing_memory", run.sizes, run.k
    time_copy(run)
    precs = ("fp32", "bf16") if run.cuda else ("fp32",)
    if not run.cuda:
        run.skip(sec, "bf16", "bf16 timings need CUDA")
    for prec in precs:
        dtype = PRECISIONS[prec][0]
        label = prec if prec != "fp32" or not run.cuda else "fp32+tf32"
        with matmul_precision("high"):
            for path in ("materialized", "small_batch"):
                if (reason := run.budget_reason()) is not None:
                    run.skip(sec, f"apply_update[{path}]", reason)
                    continue
                guarded(
                    run,
                    sec,
                    f"apply_update[{path}]",
                    str(s.apply_shape),
                    label,
                    lambda d=dtype, p=path, lb=label: time_apply(run, d, p, lb),
                )
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, "multi_tensor", reason)
                continue
            guarded(
                run,
                sec,
                "multi_tensor",
                str(s.mt_bench),
                label,
                lambda d=dtype, lb=label: time_mt(run, d, lb),
            )
    if (reason := run.budget_reason()) is not None:
        run.skip(sec, "elementwise", reason)
        return
    b, n_out = s.elem_shape
    dy, y = randn(run, b, n_out), torch.relu(randn(run, b, n_out))
    shape = shape_str(B=b, n_out=n_out)
    for name, fn, base, nbytes in (
        (
            "activation_delta",
            lambda: k.la.activation_delta(dy, y, "relu"),
            lambda: dy * (y > 0),
            12 * b * n_out,
        ),
        (
            "linear_act_bias_grad",
            lambda: k.la.linear_act_bias_grad(dy, y, 1.0, "relu"),
            lambda: (dy * (y > 0)).sum(0),
            8 * b * n_out,
        ),
    ):

        def one(name: str = name, fn: Callable = fn, base: Callable = base, nbytes: int = nbytes) -> None:
            ms, base_ms = bench(run, fn), bench(run, base)
            gbps = nbytes / ms / 1e6
            run.timing(
                sec,
                name,
                shape,
                "fp32",
                ms,
                baseline="torch ops",
                baseline_ms=base_ms,
                gbps=gbps,
                ratio=gbps / run.copy_gbps,
                ratio_def="GB/s / copy GB/s (informational)",
            )

        guarded(run, sec, name, shape, "fp32", one)


def time_copy(run: Run) -> None:
    """The device copy bandwidth that the apply kernels are measured against: ``dst.copy_(src)``."""
    n = run.sizes.copy_numel
    src = torch.rand(n, device=run.device)
    dst = torch.empty_like(src)
    ms = bench(run, lambda: dst.copy_(src))
    run.copy_gbps = 2 * n * 4 / ms / 1e6
    run.timing("timing_memory", "device_copy", shape_str(numel=n), "fp32", ms, gbps=run.copy_gbps)


def time_apply(run: Run, dtype: torch.dtype, path: str, label: str) -> None:
    sec, k = "timing_memory", run.k
    n_out, n_in = run.sizes.apply_shape
    b = run.sizes.apply_batch["bf16" if dtype == torch.bfloat16 else "fp32"]
    w, c = randn(run, n_out, n_in, dtype=dtype), torch.zeros(n_out, n_in, device=run.device, dtype=dtype)
    coef = torch.full((1,), -1e-4, device=run.device)
    if path == "materialized":
        kw: dict[str, Any] = dict(grad=randn(run, n_out, n_in))
        nbytes = apply_bytes(
            k.traffic, "fused_materialized", w.numel(), w.element_size(), c.element_size(), 4
        )
    else:
        kw = dict(x=randn(run, b, n_in, dtype=dtype), delta=randn(run, b, n_out), alpha=0.5)
        nbytes = apply_bytes(k.traffic, "fused_small_batch", w.numel(), w.element_size(), c.element_size(), 0)
        nbytes += b * (n_in * w.element_size() + n_out * 4)
    first = first_call_s(run, lambda: k.apply.apply_update(w, c, coef, **kw))
    ms = bench(run, lambda: k.apply.apply_update(w, c, coef, **kw))
    base_ms = bench(run, lambda: k.ref.apply_update(w, c, coef.reshape(()), **kw))
    gbps = nbytes / ms / 1e6
    shape = shape_str(n_out=n_out, n_in=n_in) + (f",B={b}" if path == "small_batch" else "")
    run.timing(
        sec,
        f"apply_update[{path}]",
        shape,
        label,
        ms,
        baseline="reference (torch ops)",
        baseline_ms=base_ms,
        gbps=gbps,
        ratio=gbps / run.copy_gbps,
        ratio_def="GB/s / device copy GB/s",
        target_kind="apply_vs_copy",
        bytes=nbytes,
        first_call_s=first,
    )


def time_mt(run: Run, dtype: torch.dtype, label: str) -> None:
    sec, k = "timing_memory", run.k
    count, shp = run.sizes.mt_bench
    ps = [randn(run, *shp, dtype=dtype) for _ in range(count)]
    ds = [randn(run, *shp, dtype=dtype) for _ in range(count)]
    cs = [torch.zeros(shp, device=run.device, dtype=dtype) for _ in range(count)]
    coefs = torch.full((count,), -1e-4, device=run.device)
    coef_list = list(coefs.unbind())
    n = count * ps[0].numel()
    size = ps[0].element_size()
    shape = f"{count}x{shp[0]}x{shp[1]}"
    first = first_call_s(run, lambda: k.mt.multi_tensor_reduce(ds, cs))
    ms = bench(run, lambda: k.mt.multi_tensor_reduce(ds, cs))
    base_ms = bench(run, lambda: k.ref.multi_tensor_reduce(ds, cs))
    gbps = 2 * n * size / ms / 1e6
    run.timing(
        sec,
        "multi_tensor_reduce",
        shape,
        label,
        ms,
        baseline="reference (per-tensor torch)",
        baseline_ms=base_ms,
        gbps=gbps,
        ratio=gbps / run.copy_gbps,
        ratio_def="GB/s / device copy GB/s (informational)",
        first_call_s=first,
    )

    def foreach() -> None:
        torch._foreach_addcmul_(ps, ds, coef_list)
        torch._foreach_addcmul_(cs, ds, coef_list)

    first = first_call_s(run, lambda: k.mt.multi_tensor_apply(ps, ds, cs, coefs))
    ms, base_ms = bench(run, lambda: k.mt.multi_tensor_apply(ps, ds, cs, coefs)), bench(run, foreach)
    gbps = 5 * n * size / ms / 1e6  # P and C read and written, D read
    run.timing(
        sec,
        "multi_tensor_apply",
        shape,
        label,
        ms,
        baseline="2x torch._foreach_addcmul_",
        baseline_ms=base_ms,
        gbps=gbps,
        ratio=gbps / run.copy_gbps,
        ratio_def="GB/s / device copy GB/s",
        target_kind="apply_vs_copy",
        first_call_s=first,
    )


# ------------------------------------------------------------------------------------------ timing: linear


def section_timing_linear(run: Run) -> None:
    sec = "timing_linear"
    precs = ("tf32", "bf16") if run.cuda else ("fp32",)
    if run.cuda:
        run.skip(
            sec,
            "fp32 (TF32 off)",
            "not timed: autotuning IEEE-fp32 tl.dot builds 7 configs of up to ~5 s each",
        )
    else:
        run.skip(sec, "tf32,bf16", "need CUDA")
    for prec in precs:
        with matmul_precision(PRECISIONS[prec][1]):
            for dims in run.sizes.linear_shapes:
                for kernel in ("fwd", "bwd_dx", "bwd_dw"):
                    if (reason := run.budget_reason()) is not None:
                        run.skip(sec, f"linear_act_{kernel}[{prec}]{dims}", reason)
                        continue
                    guarded(
                        run,
                        sec,
                        f"linear_act_{kernel}",
                        str(dims),
                        prec,
                        lambda d=dims, kn=kernel, p=prec: time_linear(run, p, d, kn),
                    )
            for dims in run.sizes.gram_shapes:
                if (reason := run.budget_reason()) is not None:
                    run.skip(sec, f"grad_norm_gram[{prec}]{dims}", reason)
                    continue
                guarded(
                    run, sec, "grad_norm_gram", str(dims), prec, lambda d=dims, p=prec: time_gram(run, p, d)
                )


def time_linear(run: Run, prec: str, dims: tuple[int, int, int], kernel: str) -> None:
    """One autotuned linear_act kernel against its cuBLAS matmul; also checks the autotuned output."""
    sec, k = "timing_linear", run.k
    dtype = PRECISIONS[prec][0]
    b, n_in, n_out = dims
    x, w = randn(run, b, n_in, dtype=dtype), randn(run, n_out, n_in, dtype=dtype, scale=n_in**-0.5)
    dy = randn(run, b, n_out, dtype=dtype)
    y = torch.relu(F.linear(x, w))
    if kernel == "fwd":
        fn, base = lambda: k.la.linear_act_forward(x, w, None, 1.0, 0.0, "relu"), lambda: F.linear(x, w)
        kern = k.la._linear_act_fwd_kernel
    elif kernel == "bwd_dx":
        fn, base = lambda: k.la.linear_act_backward_dx(dy, y, w, 1.0, "relu", out_dtype=dtype), lambda: dy @ w
        kern = k.la._linear_act_bwd_dx_kernel
    else:
        fn, base = lambda: k.la.linear_act_backward_dw(dy, y, x, 1.0, "relu"), lambda: dy.t() @ x
        kern = k.la._linear_act_bwd_dw_kernel
    first = first_call_s(run, fn)
    config = str(kern.best_config)
    ms, base_ms = bench(run, fn), bench(run, base)
    tflops = 2 * b * n_in * n_out / ms / 1e9
    shape = shape_str(B=b, n_in=n_in, n_out=n_out)
    run.timing(
        sec,
        f"linear_act_{kernel}",
        shape,
        prec,
        ms,
        baseline="F.linear / torch.mm (cuBLAS)",
        baseline_ms=base_ms,
        tflops=tflops,
        ratio=base_ms / ms,
        ratio_def="TFLOP/s / cuBLAS TFLOP/s",
        target_kind="linear_vs_cublas",
        first_call_s=first,
        config=config,
    )
    act = k.get_activation("relu")
    out = fn()
    with matmul_precision("highest"):
        if kernel == "fwd":
            out, ref = out[0], k.ref.linear_act_forward(x, w, None, 1.0, 0.0, act)[0]
        else:
            delta = k.ref.activation_delta(dy, y, act, True)
            if kernel == "bwd_dx":
                ref = k.ref.linear_act_backward_dx(delta, w, 1.0)
            else:
                out, ref = out[0], k.ref.linear_act_backward_dw(delta, x, 1.0)[0]
    compare(run, sec, f"linear_act_{kernel}[autotuned]", shape, prec, out, ref, config=config)


def time_gram(run: Run, prec: str, dims: tuple[int, int, int]) -> None:
    sec, k = "timing_linear", run.k
    b, n_in, n_out = dims
    x, delta = randn(run, b, n_in, dtype=PRECISIONS[prec][0]), randn(run, b, n_out)
    first = first_call_s(run, lambda: k.gram.grad_norm_sq_gram(x, delta, 1.0))
    ms = bench(run, lambda: k.gram.grad_norm_sq_gram(x, delta, 1.0))
    gram_ms = bench(run, lambda: k.ref.grad_norm_sq_gram(x, delta, 1.0))
    full_ms = bench(run, lambda: torch.linalg.vector_norm(delta.t() @ x.float()))
    run.timing(
        sec,
        "grad_norm_gram",
        shape_str(B=b, n_in=n_in, n_out=n_out),
        prec,
        ms,
        baseline="torch Gram (reference)",
        baseline_ms=gram_ms,
        ratio=gram_ms / ms,
        ratio_def="baseline ms / ms (informational)",
        materialized_norm_ms=full_ms,
        first_call_s=first,
    )


# ------------------------------------------------------------------------------------------ timing: step


def mlp_forward(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The plain MLP: ``F.linear`` + ReLU per hidden layer (α folded into the weights)."""
    for w in ws[:-1]:
        x = torch.relu(F.linear(x, w))
    return F.linear(x, ws[-1])


def unfused_stats_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    cumulatives: list[torch.Tensor],
    step_sizes: list[float],
    u: torch.Tensor,
) -> torch.Tensor:
    """The unfused PyTorch νP-SGD step with statistics (DESIGN.md's 13P row), one tensor at a time.

    Per tensor: ``‖G‖``, ``⟨G, C⟩``, ``‖C‖``, then ``P += coef·G`` and ``C += coef·G`` with
    ``coef = −u/‖G‖`` (``step_sizes``: the floats ``u``; ``u``: the same as an fp32 ``[n]``
    tensor). Returns fp32 ``[n, 4]``: ``‖G‖``, ``⟨ΔP, C⟩``, ``‖C‖`` and the cosine.
    """
    rows = []
    for p, g, c, step in zip(params, grads, cumulatives, step_sizes):
        g_norm = g.norm()
        dot = (g * c).sum()
        c_norm = c.norm()
        coef = -step / g_norm
        p.addcmul_(g, coef)
        c.addcmul_(g, coef)
        rows.append(torch.stack((g_norm, coef * dot, c_norm)))
    stats = torch.stack(rows).float()
    cos = stats[:, 1] / (stats[:, 2] * u).clamp_min(1e-30)
    return torch.cat((stats, cos[:, None]), dim=1)


def make_step(
    run: Run, kind: str, base: Any, x: torch.Tensor, y: torch.Tensor, update: Callable | None = None
) -> Callable[[], None]:
    """One training step of variant ``kind`` on a copy of ``base`` (a NuMLP)."""
    k = run.k
    if kind in ("drop_in", "fused"):
        model = copy.deepcopy(base)
        opt = k.NuP(
            model.named_parameters(), lr=0.05, schedule=k.make_schedule("geometry"), fused=kind == "fused"
        )
        return lambda: _train_step(model, opt, x, y)
    ws = [(layer.alpha * layer.weight.detach()).clone().requires_grad_(True) for layer in base.layers]
    if kind == "plain":
        sgd = torch.optim.SGD(ws, lr=1e-3, fused=True)

        def plain() -> None:
            F.cross_entropy(mlp_forward(ws, x), y).backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        return plain
    cs = [torch.zeros_like(w) for w in ws]
    sizes = [0.05 * layer.weight_meta.scale for layer in base.layers]
    u = torch.tensor(sizes, device=x.device)
    update = update or unfused_stats_update

    def unfused() -> None:
        F.cross_entropy(mlp_forward(ws, x), y).backward()
        with torch.no_grad():
            update([w.detach() for w in ws], [w.grad for w in ws], cs, sizes, u)
        for w in ws:
            w.grad = None

    return unfused


def _step_model(run: Run, depth: int, dtype: torch.dtype) -> Any:
    s = run.sizes
    torch.manual_seed(0)
    model = run.k.NuMLP(s.step_io[0], s.step_io[1], depth, s.step_m, max_width=s.step_max_width)
    return model.to(device=run.device, dtype=dtype)


def _fused_path(run: Run, batch: int, dtype: torch.dtype) -> str:
    path = run.k.apply.choose_update_path(batch, 1, 1, dtype)
    return "fused_small_batch" if path == "small_batch" else "fused_materialized"


def _record_variant(
    run: Run,
    sec: str,
    label: str,
    kind: str,
    ms: float,
    first: float,
    widths: list[int],
    batch: int,
    dtype: torch.dtype,
    shape: str,
) -> None:
    path = {
        "plain": "plain_sgd",
        "unfused": "unfused_stats",
        "compiled": "unfused_stats",
        "drop_in": None,
        "fused": _fused_path(run, batch, dtype),
    }[kind]
    extra: dict[str, Any] = {"first_call_s": first}
    if path is not None:
        t = run.k.traffic.model_traffic(widths, path, batch, torch.finfo(dtype).bits // 8)
        extra.update(traffic_path=path, traffic_bytes=t["bytes"], gbps=t["bytes"] / ms / 1e6)
    run.timing(sec, f"step:{kind}", shape, label, ms, **extra)


def section_timing_step(run: Run, dtype_name: str, depths: tuple[int, ...]) -> None:
    """Fused step against plain, unfused and drop-in steps on the depth × batch grid."""
    sec = "timing_step" if dtype_name == "fp32" else "timing_step_bf16"
    label = dtype_name if dtype_name != "fp32" or not run.cuda else "fp32+tf32"
    with matmul_precision("high"):
        for depth in depths:
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, f"depth={depth}", reason)
                continue
            time_depth(run, sec, label, dtype_name, depth)
            free_memory(run)


def time_depth(run: Run, sec: str, label: str, dtype_name: str, depth: int) -> None:
    s = run.sizes
    dtype = PRECISIONS[dtype_name][0]
    base = _step_model(run, depth, dtype)
    for batch in s.batches:
        shape = shape_str(depth=depth, B=batch, max_width=max(base.widths))
        x, y = _data(run, batch, s.step_io[0], s.step_io[1])
        x = x.to(dtype)
        result = run.steps.setdefault((dtype_name, depth, batch), {"widths": base.widths})
        for kind in STEP_VARIANTS:
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, f"{kind}[{shape}]", reason)
                continue

            def one(
                kind: str = kind,
                shape: str = shape,
                x: torch.Tensor = x,
                y: torch.Tensor = y,
                batch: int = batch,
                result: dict = result,
            ) -> None:
                fn = make_step(run, kind, base, x, y)
                first = first_call_s(run, fn)
                ms = bench(run, fn)
                result[kind] = ms
                _record_variant(run, sec, label, kind, ms, first, base.widths, batch, dtype, shape)

            guarded(run, sec, f"step:{kind}", shape, label, one)
            free_memory(run)
        _compare_step(run, sec, label, shape, result, batch == min(s.batches))
        run.write()


def _compare_step(run: Run, sec: str, label: str, shape: str, r: dict[str, Any], small_batch: bool) -> None:
    if "fused" not in r:
        return
    fused = r["fused"]
    if "plain" in r:
        e = run.timing(
            sec,
            "step:fused_vs_plain",
            shape,
            label,
            fused,
            baseline="plain",
            baseline_ms=r["plain"],
            ratio=fused / r["plain"],
            ratio_def="fused ms / plain ms",
            target_kind="fused_vs_plain",
        )
        if small_batch:
            e["stretch_target"], e["stretch_passed"] = (
                "fused_vs_plain <= 1.0 at small batch",
                e["ratio"] <= 1.0,
            )
    if "unfused" in r:
        run.timing(
            sec,
            "step:fused_vs_unfused",
            shape,
            label,
            fused,
            baseline="unfused",
            baseline_ms=r["unfused"],
            ratio=r["unfused"] / fused,
            ratio_def="unfused ms / fused ms",
            target_kind="fused_vs_unfused",
        )
    if "drop_in" in r and "plain" in r:
        run.timing(
            sec,
            "step:drop_in_vs_plain",
            shape,
            label,
            r["drop_in"],
            baseline="plain",
            baseline_ms=r["plain"],
            ratio=r["drop_in"] / r["plain"],
            ratio_def="drop-in ms / plain ms (informational)",
        )


def section_timing_step_compiled(run: Run) -> None:
    """torch.compile of the unfused statistics step, once per depth, against the fused step."""
    sec, s = "timing_step_compiled", run.sizes
    backend = "inductor" if run.cuda else "eager"  # inductor's CPU C++ build alone takes minutes
    run.data["settings"]["step_variants"]["compiled"] += f" (backend={backend!r})"
    with matmul_precision("high"):
        for depth in s.depths:
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, f"depth={depth}", reason)
                continue
            if run.cuda and not run.tiny and run.budget_s - run.elapsed() < 30:
                run.skip(sec, f"depth={depth}", "less than 30 s of budget left for torch.compile")
                continue
            time_compiled_depth(run, sec, depth, backend)
            free_memory(run)


def time_compiled_depth(run: Run, sec: str, depth: int, backend: str) -> None:
    s = run.sizes
    label = "fp32+tf32" if run.cuda else "fp32"
    torch._dynamo.reset()
    compiled = torch.compile(unfused_stats_update, backend=backend)
    base = _step_model(run, depth, torch.float32)
    error = None
    for batch in s.batches:
        shape = shape_str(depth=depth, B=batch, max_width=max(base.widths))
        if (reason := run.budget_reason()) is not None:
            run.skip(sec, f"compiled[{shape}]", reason)
            continue
        r = run.steps.setdefault(("fp32", depth, batch), {"widths": base.widths})
        if error is None:
            x, y = _data(run, batch, s.step_io[0], s.step_io[1])
            try:
                fn = make_step(run, "compiled", base, x, y, update=compiled)
                first = first_call_s(run, fn)
                r["compiled"] = bench(run, fn)
                _record_variant(
                    run,
                    sec,
                    label,
                    "compiled",
                    r["compiled"],
                    first,
                    base.widths,
                    batch,
                    torch.float32,
                    shape,
                )
            except Exception:
                error = traceback.format_exc()
        if error is not None:
            run.timing(sec, "step:compiled", shape, label, None, error=error[-4000:])
        elif "fused" in r:
            run.timing(
                sec,
                "step:fused_vs_compiled",
                shape,
                label,
                r["fused"],
                baseline="compiled",
                baseline_ms=r["compiled"],
                ratio=r["compiled"] / r["fused"],
                ratio_def="compiled ms / fused ms",
                target_kind="fused_vs_compiled",
            )
        free_memory(run)
        run.write()


# ------------------------------------------------------------------------------------------ driver


def load_kernels() -> SimpleNamespace:
    """The modules under test (imported after TRITON_INTERPRET is settled)."""
    import nup
    import nup_kernels.apply_update as apply
    import nup_kernels.gram_norm as gram
    import nup_kernels.linear_act as la
    import nup_kernels.multi_tensor as mt
    import nup_kernels.reference as ref
    import nup_kernels.traffic as traffic
    from nup_kernels.activations import get_activation

    return SimpleNamespace(
        la=la,
        gram=gram,
        apply=apply,
        mt=mt,
        ref=ref,
        traffic=traffic,
        get_activation=get_activation,
        NuMLP=nup.NuMLP,
        NuP=nup.NuP,
        make_schedule=nup.make_schedule,
    )


def plan(run: Run) -> list[tuple[str, Callable[[], str | None], str | None]]:
    """``(section, function, reason to skip)`` in running order."""
    gpu_only = None if run.cuda else "needs CUDA (TF32 and bf16 are not checked in the CPU interpreter)"
    return [
        ("compile", lambda: section_compile(run), None),
        ("correctness_fp32", lambda: section_correctness(run, "fp32"), None),
        ("correctness_tf32", lambda: section_correctness(run, "tf32"), gpu_only),
        ("correctness_bf16", lambda: section_correctness(run, "bf16"), gpu_only),
        ("fused_step", lambda: section_fused_step(run), None),
        ("host_sync", lambda: section_host_sync(run), None),
        ("timing_memory", lambda: section_timing_memory(run), None),
        ("timing_step", lambda: section_timing_step(run, "fp32", run.sizes.depths), None),
        ("timing_step_compiled", lambda: section_timing_step_compiled(run), None),
        ("timing_linear", lambda: section_timing_linear(run), None),
        ("timing_step_bf16", lambda: section_timing_step(run, "bf16", run.sizes.bf16_depths), gpu_only),
    ]


def run_sections(run: Run, selected: set[str]) -> None:
    for name, fn, reason in plan(run):
        if name not in selected:
            reason = "not selected (--only / --skip)"
        if reason is None and name.startswith("timing"):
            reason = run.budget_reason()
        print(f"[{run.elapsed():7.1f} s] {name}" + (f": skipped ({reason})" if reason else ""), flush=True)
        if reason is not None:
            run.data["sections"][name] = {"status": "skipped", "reason": reason, "seconds": 0.0}
            run.write()
            continue
        t = time.perf_counter()
        entry: dict[str, Any] = {"status": "ok", "reason": None}
        try:
            if (skipped := fn()) is not None:
                entry.update(status="skipped", reason=skipped)
        except Exception:
            entry.update(status="error", error=traceback.format_exc())
            print(f"  ERROR in {name}:\n{entry['error']}", flush=True)
        finally:
            entry["seconds"] = round(time.perf_counter() - t, 2)
            run.data["sections"][name] = entry
            free_memory(run)
            run.write()


def summarize(run: Run) -> int:
    """Print the table, fill in the summary; return the exit status."""
    d = run.data
    failed = [c for c in d["checks"] if not c["passed"]]
    errors = [n for n, s in d["sections"].items() if s["status"] == "error"]
    targets = [t for t in d["timings"] if t["target"] is not None]
    d["summary"] = {
        "checks": len(d["checks"]),
        "checks_failed": len(failed),
        "sections_error": errors,
        "targets": len(targets),
        "targets_passed": sum(bool(t["passed"]) for t in targets),
        "timings_meaningful": d["timings_meaningful"],
        "seconds": round(run.elapsed(), 1),
    }
    d["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    d["complete"] = True
    run.write()
    print("\n==== gpu_check summary " + "=" * 60)
    print(
        f"device {d['env']['device']}  torch {d['env']['torch']}  triton {d['env']['triton']}  "
        f"mode {d['mode']}  {run.elapsed():.0f} s"
    )
    for name, s in d["sections"].items():
        n = [c for c in d["checks"] if c["section"] == name]
        bad = sum(not c["passed"] for c in n)
        print(
            f"  {name:<22} {s['status']:<8} {s['seconds']:7.1f} s  checks {len(n) - bad}/{len(n)} passed"
            + (f"  ({s['reason']})" if s.get("reason") else "")
        )
    for c in failed[:25]:
        print(
            f"  FAILED {c['section']}/{c['name']} [{c['shape']}, {c['dtype']}] {c['metric']}={c['error']:.3g}"
            f" tol={c['tolerance']:g}"
        )
    if len(failed) > 25:
        print(f"  ... and {len(failed) - 25} more failed checks (see the JSON)")
    if d["timing_note"]:
        print(f"  timings: {d['timing_note']}")
    if d["timings_meaningful"]:
        print(f"  targets passed {d['summary']['targets_passed']}/{len(targets)}")
    for t in d["timings"]:
        if t["target"] is not None or t["name"] in ("device_copy",) or t.get("error"):
            print("  " + _timing_line(t) + ("  ERROR" if t.get("error") else ""))
    print(f"  JSON: {run.path}")
    return 1 if failed or errors else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="no timing item starts after this many seconds (default 270)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny shapes, 1-2 repeats; runs on CPU via the interpreter"
    )
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    return p.parse_args(argv)


def _names(text: str) -> set[str]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        selected = (_names(args.only) or set(SECTIONS)) - _names(args.skip)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(
            "gpu_check: no CUDA device found. This script checks and times the Triton kernels on a GPU; "
            "use --tiny to exercise it on CPU through Triton's interpreter.",
            file=sys.stderr,
        )
        return 2
    if not cuda:  # before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("NUP_BACKEND", "triton")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    run = Run(
        args,
        torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        load_kernels(),
    )
    run.write()
    run_sections(run, selected)
    return summarize(run)


if __name__ == "__main__":
    sys.exit(main())
