"""Sections ``compile`` and ``correctness_*``: every kernel against ``nup_kernels.reference``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gpu.helpers import bits, compare, first_call_s, guarded, matmul_precision, pinned_configs, randn, shape_str
from gpu.record import Run
from gpu.settings import PRECISIONS, TOLERANCE


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
