"""Sections ``timing_memory`` and ``timing_linear``: kernels against copy bandwidth and cuBLAS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gpu.helpers import bench, compare, first_call_s, guarded, matmul_precision, randn, shape_str
from gpu.record import Run
from gpu.settings import PRECISIONS


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
