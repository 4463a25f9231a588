"""Microbenchmarks of every kernel against the PyTorch a user would write instead.

Providers: ``nup`` runs the Triton kernel on CUDA and the reference implementation
(:mod:`nup_kernels.reference`, labelled ``reference``) on CPU; ``torch`` is the plain PyTorch
equivalent, the baseline of the ratios. ``bytes`` is the traffic the op needs at least (read its
inputs once, write its outputs once; fp32), ``flops`` the matmul FLOPs (None for the pure
bandwidth ops), so achieved rates compare the providers on the same work.

Shapes: ``(B, n_in, n_out)`` for the linear and update ops; the multi-tensor ops take the weight
list of a νP MLP (``StepCase`` widths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import common
import pytest
import torch
import torch.nn.functional as F

from nup_kernels import reference
from nup_kernels.activations import get_activation

KERNEL_PROVIDERS = ("nup", "torch")
KERNEL_BASELINE = "torch"
LINEAR_OPS = (
    "linear_fwd", "linear_bwd_dx", "linear_bwd_dw", "gram_norm", "apply_materialized", "apply_small_batch",
)  # fmt: skip
MULTI_TENSOR_OPS = ("multi_tensor_reduce", "multi_tensor_apply")
#: (B, n_in, n_out) per device kind; quick mode uses one tiny shape
SHAPES = {"cpu": ((32, 1024, 1024), (1024, 1024, 1024)), "cuda": ((64, 4096, 4096), (4096, 4096, 4096))}
QUICK_SHAPES = ((8, 64, 48),)
#: the νP model whose weight list the multi-tensor ops run over: (depth, m, max_width)
MULTI_TENSOR_MODELS = {"cpu": (16, 4, None), "cuda": (64, 1, 2048)}
QUICK_MULTI_TENSOR_MODEL = (4, 4, None)
ALPHA = 0.05
COEF = -1e-6  # small, so the in-place updates barely move the tensors over many rounds
RELU = get_activation("relu")
FP32 = 4


@dataclass(frozen=True)
class KernelCase:
    op: str
    shape: tuple[int, ...]  # (B, n_in, n_out), or (depth, m, max_width) for the multi-tensor ops

    @property
    def name(self) -> str:
        if self.op in MULTI_TENSOR_OPS:
            depth, m, cap = self.shape
            return f"{self.op}-depth{depth}-m{m}" + (f"-cap{cap}" if cap else "")
        return f"{self.op}-" + "x".join(map(str, self.shape))


@dataclass
class KernelRun:
    fn: Callable[[], object]
    bytes: int
    flops: int | None


def kernel_cases(quick: bool, kind: str) -> list[KernelCase]:
    shapes = QUICK_SHAPES if quick else SHAPES[kind]
    mt_model = QUICK_MULTI_TENSOR_MODEL if quick else MULTI_TENSOR_MODELS[kind]
    linear = [KernelCase(op, s) for op in LINEAR_OPS for s in shapes]
    return linear + [KernelCase(op, mt_model) for op in MULTI_TENSOR_OPS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kernel_case" in metafunc.fixturenames:
        opts = common.options_from(metafunc.config)
        pairs = [(c, p) for c in kernel_cases(opts["quick"], common.device().type) for p in KERNEL_PROVIDERS]
        metafunc.parametrize("kernel_case,provider", pairs, ids=[f"{c.name}-{p}" for c, p in pairs])


def _linear_run(op: str, provider: str, shape: tuple[int, ...], dev: torch.device) -> KernelRun:
    """One linear or update op on random fp32 tensors; ``provider``: triton, reference or torch."""
    batch, n_in, n_out = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_in, generator=gen).to(dev)
    w = torch.randn(n_out, n_in, generator=gen).to(dev)
    dy = torch.randn(batch, n_out, generator=gen).to(dev)
    y = torch.relu(torch.randn(batch, n_out, generator=gen)).to(dev)  # the saved ReLU output
    delta = torch.where(y > 0, dy, 0.0)
    grad, cum = (torch.randn(n_out, n_in, generator=gen).to(dev) for _ in range(2))
    coef = torch.tensor(COEF, device=dev)
    P = n_in * n_out
    io = FP32 * batch * (n_in + n_out)
    matmul = 2 * batch * P
    if provider == "triton":
        from nup_kernels import linear_act as la
        from nup_kernels.apply_update import apply_update
        from nup_kernels.gram_norm import grad_norm_sq_gram
    else:
        apply_update, grad_norm_sq_gram = reference.apply_update, reference.grad_norm_sq_gram

    def user_update(g: torch.Tensor) -> torch.Tensor:
        dot = (g * cum).sum()
        w.addcmul_(g, coef)
        cum.addcmul_(g, coef)
        return dot

    fns: dict[str, dict[str, Callable[[], object]]] = {
        "linear_fwd": {
            "triton": lambda: la.linear_act_forward(x, w, None, ALPHA, 0.0, RELU),
            "reference": lambda: reference.linear_act_forward(x, w, None, ALPHA, 0.0, RELU),
            "torch": lambda: F.relu(F.linear(x, w)),
        },
        "linear_bwd_dx": {
            "triton": lambda: la.linear_act_backward_dx(dy, y, w, ALPHA, RELU),
            "reference": lambda: reference.linear_act_backward_dx(
                reference.activation_delta(dy, y, RELU, True), w, ALPHA
            ),
            "torch": lambda: torch.where(y > 0, dy, 0.0) @ w,
        },
        "linear_bwd_dw": {
            "triton": lambda: la.linear_act_backward_dw(dy, y, x, ALPHA, RELU),
            "reference": lambda: reference.linear_act_backward_dw(
                reference.activation_delta(dy, y, RELU, True), x, ALPHA
            ),
            "torch": lambda: torch.linalg.vector_norm(torch.where(y > 0, dy, 0.0).t() @ x),
        },
        "gram_norm": {
            "triton": lambda: grad_norm_sq_gram(x, delta, ALPHA),
            "reference": lambda: grad_norm_sq_gram(x, delta, ALPHA),
            "torch": lambda: torch.linalg.vector_norm(ALPHA * (delta.t() @ x)).square(),
        },
        "apply_materialized": {
            "triton": lambda: apply_update(w, cum, coef, grad=grad),
            "reference": lambda: apply_update(w, cum, coef, grad=grad),
            "torch": lambda: user_update(grad),
        },
        "apply_small_batch": {
            "triton": lambda: apply_update(w, cum, coef, x=x, delta=delta, alpha=ALPHA),
            "reference": lambda: apply_update(w, cum, coef, x=x, delta=delta, alpha=ALPHA),
            "torch": lambda: user_update(ALPHA * (delta.t() @ x)),
        },
    }
    cost = {  # (bytes, flops)
        "linear_fwd": (io + FP32 * P, matmul),
        "linear_bwd_dx": (io + FP32 * (P + batch * n_out), matmul),
        "linear_bwd_dw": (io + FP32 * (P + batch * n_out), matmul),
        "gram_norm": (io, 2 * batch * batch * (n_in + n_out)),
        "apply_materialized": (5 * FP32 * P, None),
        "apply_small_batch": (4 * FP32 * P + io, matmul),
    }[op]
    return KernelRun(fns[op][provider], *cost)


def _multi_tensor_run(
    op: str, provider: str, model: tuple[int, int, int | None], dev: torch.device
) -> KernelRun:
    """``multi_tensor_reduce`` / ``multi_tensor_apply`` over a νP MLP's weights (fp32)."""
    depth, m, cap = model
    widths = common.StepCase(depth, m, cap, 1).model().widths
    gen = torch.Generator().manual_seed(0)
    shapes = [(n_out, n_in) for n_in, n_out in zip(widths[:-1], widths[1:])]
    params, directions, cums = ([torch.randn(s, generator=gen).to(dev) for s in shapes] for _ in range(3))
    coefs = torch.full((len(shapes),), COEF, device=dev)
    total = sum(p.numel() for p in params)
    if provider == "triton":
        from nup_kernels.multi_tensor import multi_tensor_apply, multi_tensor_reduce
    else:
        multi_tensor_apply, multi_tensor_reduce = reference.multi_tensor_apply, reference.multi_tensor_reduce

    def user_reduce() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d_norm = torch.stack(torch._foreach_norm(directions))
        dots = torch.stack([(d * c).sum() for d, c in zip(directions, cums)])
        return d_norm, dots, torch.stack(torch._foreach_norm(cums))

    def user_apply() -> None:
        scalars = list(coefs.unbind())
        torch._foreach_addcmul_(params, directions, scalars)
        torch._foreach_addcmul_(cums, directions, scalars)

    if op == "multi_tensor_reduce":
        fn = user_reduce if provider == "torch" else lambda: multi_tensor_reduce(directions, cums)
        return KernelRun(fn, 2 * FP32 * total, None)
    fn = user_apply if provider == "torch" else lambda: multi_tensor_apply(params, directions, cums, coefs)
    return KernelRun(fn, 5 * FP32 * total, None)


def test_kernel(benchmark, kernel_case: KernelCase, provider: str, bench_options: dict) -> None:
    dev = common.device()
    impl = provider if provider == "torch" else ("triton" if dev.type == "cuda" else "reference")
    make = _multi_tensor_run if kernel_case.op in MULTI_TENSOR_OPS else _linear_run
    run = make(kernel_case.op, impl, kernel_case.shape, dev)
    baseline = (
        None if provider == KERNEL_BASELINE else make(kernel_case.op, KERNEL_BASELINE, kernel_case.shape, dev)
    )
    extra = {
        "suite": "kernels", "case": kernel_case.name, "op": kernel_case.op, "shape": list(kernel_case.shape),
        "provider": provider, "baseline": KERNEL_BASELINE, "impl": impl,
        "bytes": run.bytes, "flops": run.flops,
    }  # fmt: skip
    common.run_benchmark(benchmark, run.fn, dev, bench_options, extra, baseline and baseline.fn)
