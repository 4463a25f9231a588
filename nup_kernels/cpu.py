"""The fast CPU path: BLAS with α folded into the GEMM, and a one-loop update.

- :class:`ScaledLinearAct`: ``y = φ(α·x Wᵀ + bias_scale·b)`` with ``α`` passed to ``addmm`` in the
  forward and in both backward GEMMs (no extra pass over ``h``, ``dx`` or ``dW``). Its backward is
  written in differentiable torch ops, so double backward (Hessian-vector products) still works.
  Only for activations whose ``φ'`` is read from ``y`` (ReLU, leaky ReLU, identity, tanh).
- :func:`update_and_dot`: ``W += coef·G``, ``C += coef·G`` and ``⟨G, C_old⟩`` in one loop over
  fp32 contiguous tensors (read W, C, G; write W, C). The loop is a few lines of C compiled once
  per machine with the system C compiler into ``$NUP_CACHE_DIR`` (default ``~/.cache/nup``) and
  called through ctypes; without a compiler, or with ``NUP_CPU_LOOP=0``, the same result comes
  from eager torch (``torch.dot`` and two ``add_``: three passes more).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from nup_kernels.activations import Activation
from nup_kernels.backend import env_value

_LOOP_SOURCE = r"""
#include <math.h>
#include <stdint.h>
/* W += coef*G; C += coef*G (or, with init, C holds P_0 and C_old = W - P_0); returns <G, C_old>. */
float nup_update_dot(float *restrict w, float *restrict c, const float *restrict g, int64_t n, float coef, int init) {
    float acc = 0.0f;
    if (init) {
        #pragma omp simd reduction(+:acc)
        for (int64_t i = 0; i < n; ++i) {
            float gi = g[i], wi = w[i];
            acc += gi * (wi - c[i]);
            w[i] = wi + coef * gi;
        }
    } else {
        #pragma omp simd reduction(+:acc)
        for (int64_t i = 0; i < n; ++i) {
            float gi = g[i], ci = c[i], s = coef * gi;
            acc += gi * ci;
            w[i] += s;
            c[i] = ci + s;
        }
    }
    return acc;
}
/* many tensors in one call: out[j] = <G_j, C_j,old> after W_j += coef_j*G_j (a zero coef_j leaves tensor j as it is) */
void nup_update_dot_many(float *const *w, float *const *c, const float *const *g, const int64_t *n,
                         const float *coef, int64_t count, int init, float *out) {
    for (int64_t j = 0; j < count; ++j)
        out[j] = coef[j] == 0.0f ? 0.0f : nup_update_dot(w[j], c[j], g[j], n[j], coef[j], init);
}
/* sum of x^2: 64 fp32 lanes (four vector chains, so the sum streams at load speed), added in double */
double nup_sum_squares(const float *restrict x, int64_t n) {
    float lanes[64] = {0.0f};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        #pragma omp simd
        for (int j = 0; j < 64; ++j) lanes[j] += x[i + j] * x[i + j];
    }
    double acc = 0.0;
    for (; i < n; ++i) acc += (double)x[i] * x[i];
    for (int j = 0; j < 64; ++j) acc += lanes[j];
    return acc;
}
/* 1 when every entry is finite: x*0 is 0 for finite x, NaN for NaN and +-inf (no -ffast-math) */
int nup_all_finite(const float *restrict x, int64_t n) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * 0.0f;
    return acc == 0.0f;
}
/* dst = src, and 1 when every entry of g is finite (wrapper mode: the snapshot before the base steps) */
int nup_snapshot_finite(float *restrict dst, const float *restrict src, const float *restrict g, int64_t n) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) { dst[i] = src[i]; acc += g[i] * 0.0f; }
    return acc == 0.0f;
}
/* sum of (a - b)^2 */
double nup_dist_sq(const float *restrict a, const float *restrict b, int64_t n) {
    double acc = 0.0;  /* double: the square of any finite fp32 difference fits */
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) { double d = (double)a[i] - (double)b[i]; acc += d * d; }
    return acc;
}
/* wrapper mode: D = old - p (what the base moved, as a descent direction); p = old + coef*D;
   C += coef*D; returns <D, C_old> */
float nup_rebase_update(float *restrict p, const float *restrict old, float *restrict c, int64_t n, float coef) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) {
        float o = old[i], d = o - p[i], ci = c[i], s = coef * d;
        acc += d * ci;
        p[i] = o + s;
        c[i] = ci + s;
    }
    return acc;
}
/* Adam's direction at entry i after its moments are updated (a torch Adam/AdamW base in wrapper mode):
   D = step_size*m/(sqrt(v)/bc2s + eps) + dwd*p, as torch's step P -= step_size*m/denom; P *= 1 - dwd. */
#define NUP_ADAM_STEP(i) (step_size * (m[i] / (sqrtf(v[i]) / bc2s + eps)))
#define NUP_ADAM_D(i) (NUP_ADAM_STEP(i) + dwd * p[i])
#define NUP_ADAM_MOMENTS(GRAD, DECAY)                                                  \
    _Pragma("omp simd reduction(+:acc)")                                              \
    for (int64_t i = 0; i < n; ++i) {                                                 \
        float gi = GRAD;                                                              \
        m[i] = m[i] + omb1 * (gi - m[i]);                                             \
        v[i] = v[i] * b2 + (omb2 * gi) * gi;                                          \
        double d = NUP_ADAM_STEP(i) + DECAY;                                          \
        acc += d * d;                                                                 \
    }
/* The base's moment update, in its own state: g' = sign*g + l2*p; m += (1-b1)(g' - m); v = b2*v + (1-b2)g'^2.
   Returns sum of D^2 (double). Without weight decay P is not read. */
double nup_adam_moments(const float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                        int64_t n, float sign, float l2, float omb1, float b2, float omb2,
                        float step_size, float bc2s, float eps, float dwd) {
    double acc = 0.0;
    if (l2 == 0.0f && dwd == 0.0f) {
        NUP_ADAM_MOMENTS(sign * g[i], 0.0f)
    } else {
        NUP_ADAM_MOMENTS(sign * g[i] + l2 * p[i], dwd * p[i])
    }
    return acc;
}
/* NuP's step along Adam's direction D (recomputed from m, v, p): p += coef*D; C += coef*D; returns <D, C_old> */
float nup_adam_apply(float *restrict p, const float *restrict m, const float *restrict v, float *restrict c,
                     int64_t n, float step_size, float bc2s, float eps, float dwd, float coef) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) {
        float d = NUP_ADAM_D(i), ci = c[i], s = coef * d;
        acc += d * ci;
        p[i] += s;
        c[i] = ci + s;
    }
    return acc;
}
"""
_CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")


def _cache_dir() -> Path:
    return Path(os.environ.get("NUP_CACHE_DIR") or Path.home() / ".cache" / "nup")


@functools.lru_cache(maxsize=1)
def _loop_library() -> ctypes.CDLL | None:
    """The compiled one-loop update, built on first use; None without a C compiler."""
    digest = hashlib.sha256((_LOOP_SOURCE + " ".join(_CFLAGS)).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"nup_cpu_loop_{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "loop.c", Path(tmp) / "loop.so"
            src.write_text(_LOOP_SOURCE)
            cc = os.environ.get("CC", "cc")
            try:
                subprocess.run([cc, *_CFLAGS, str(src), "-o", str(out)], check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError):
                return None
            os.replace(out, lib)  # atomic: concurrent builders agree on one file
    dll = ctypes.CDLL(str(lib))
    ptr, n, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for name, args in (
        ("nup_update_dot", [ptr, ptr, ptr, n, f32, ctypes.c_int]),
        ("nup_dist_sq", [ptr, ptr, n]),
        ("nup_rebase_update", [ptr, ptr, ptr, n, f32]),
        ("nup_all_finite", [ptr, n]),
        ("nup_snapshot_finite", [ptr, ptr, ptr, n]),
        ("nup_adam_moments", [ptr, ptr, ptr, ptr, n, *[f32] * 9]),
        ("nup_adam_apply", [ptr, ptr, ptr, ptr, n, *[f32] * 5]),
        ("nup_update_dot_many", [ptr, ptr, ptr, ptr, ptr, n, ctypes.c_int, ptr]),
        ("nup_sum_squares", [ptr, n]),
    ):
        getattr(dll, name).restype, getattr(dll, name).argtypes = f32, args
    dll.nup_dist_sq.restype = dll.nup_adam_moments.restype = dll.nup_sum_squares.restype = ctypes.c_double
    dll.nup_update_dot_many.restype = None
    dll.nup_all_finite.restype = dll.nup_snapshot_finite.restype = ctypes.c_int
    return dll


def loop_available() -> bool:
    """True when the compiled one-loop update is used (``NUP_CPU_LOOP=0`` turns it off)."""
    return env_value("NUP_CPU_LOOP", "1") != "0" and _loop_library() is not None


def update_and_dot(
    weight: torch.Tensor, cumulative: torch.Tensor, grad: torch.Tensor, coef: float, init: bool = False
) -> float:
    """``W += coef·G`` and ``C += coef·G`` in place (``init``: ``C`` holds ``P_0``, left as is); return
    ``⟨G, C_old⟩`` as a float. CPU tensors of one shape; ``coef`` is a host float (never 0 here:
    the caller skips the call for a skipped tensor). fp32 contiguous tensors take the one loop."""
    if loop_ready(weight, cumulative, grad):
        fn = _loop_library().nup_update_dot
        return fn(weight.data_ptr(), cumulative.data_ptr(), grad.data_ptr(), weight.numel(), coef, int(init))
    acc = torch.promote_types(weight.dtype, torch.float32)  # float64 tensors: float64 statistics
    g = grad.to(acc).reshape(-1)
    c_old = weight.to(acc) - cumulative.to(acc) if init else cumulative.to(acc)
    dot = float(torch.dot(g, c_old.reshape(-1)))
    weight.add_(grad.to(weight.dtype), alpha=coef)
    if not init:
        cumulative.add_(grad.to(cumulative.dtype), alpha=coef)
    return dot


def update_and_dot_many(
    weights: list[torch.Tensor], cumulatives: list[torch.Tensor], grads: list[torch.Tensor], coefs: list[float],
    init: bool = False,
) -> list[float]:
    """:func:`update_and_dot` for every tensor (a ``coef`` of 0.0 skips its tensor and gives 0.0): the
    tensors the loop takes go through one C call, the others through eager torch one by one."""
    dots = [0.0] * len(weights)
    plain = _plain_fp32 if loop_available() else lambda t: False
    fast = []
    for i, (w, c, g, cf) in enumerate(zip(weights, cumulatives, grads, coefs, strict=True)):
        if cf == 0.0:
            continue
        if plain(w) and plain(c) and plain(g):
            fast.append(i)
        else:
            dots[i] = update_and_dot(w, c, g, cf, init)
    if fast:
        k, ptrs = len(fast), ctypes.c_void_p * len(fast)
        out = (ctypes.c_float * k)()
        _loop_library().nup_update_dot_many(
            ptrs(*[weights[i].data_ptr() for i in fast]), ptrs(*[cumulatives[i].data_ptr() for i in fast]),
            ptrs(*[grads[i].data_ptr() for i in fast]), (ctypes.c_int64 * k)(*[weights[i].numel() for i in fast]),
            (ctypes.c_float * k)(*[coefs[i] for i in fast]), k, int(init), out,
        )  # fmt: skip
        for i, dot in zip(fast, out):
            dots[i] = dot
    return dots


def _plain_fp32(t: torch.Tensor) -> bool:
    """An fp32, contiguous, plain (not DTensor) CPU tensor: what the loops take."""
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and not hasattr(t, "to_local")


def loop_ready(*tensors: torch.Tensor) -> bool:
    """True when the compiled loops take these tensors (fp32, contiguous, on CPU, the loops built)."""
    return all([_plain_fp32(t) for t in tensors]) and loop_available()  # DTensor shards take the sharded path


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or ±Inf: one read of each, nothing written (fp32 tensors take the
    compiled loop, which streams at copy speed; ``torch``'s max-norm is several times slower on CPU)."""
    lib = _loop_library() if loop_available() else None
    for t in tensors:
        if lib is not None and loop_ready(t):
            if not lib.nup_all_finite(t.data_ptr(), t.numel()):
                return False
        elif not bool(torch.isfinite(t).all()):
            return False
    return True


def snapshot_if_finite(dst: list[torch.Tensor], src: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Copy each ``src`` into ``dst`` and return True when no gradient holds NaN or ±Inf: one pass
    per tensor (the copy and the check share it). Tensors the loop does not take use torch."""
    finite = True
    lib = _loop_library() if loop_available() else None
    for d, s, g in zip(dst, src, grads, strict=True):
        if lib is not None and loop_ready(d, s, g):
            finite &= bool(lib.nup_snapshot_finite(d.data_ptr(), s.data_ptr(), g.data_ptr(), d.numel()))
        else:
            d.copy_(s)
            finite &= all_finite([g])
    return finite


def sum_squares(t: torch.Tensor) -> float:
    """``Σ t²`` as a float: fp32 lanes added in double by one loop (the caller checked :func:`loop_ready`).
    A sum beyond fp32's range comes back beyond it (inf from the lanes, or exact from the tail) and a
    tiny one may underflow, as torch's fp32 sum would: the caller redoes sums out of the exact range."""
    return _loop_library().nup_sum_squares(t.data_ptr(), t.numel())


def dist_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖²`` (one read of each, nothing written) as a float, accumulated in double."""
    if loop_ready(a, b):
        return _loop_library().nup_dist_sq(a.data_ptr(), b.data_ptr(), a.numel())
    return float((a.double() - b.double()).square().sum())


def rebase_update(param: torch.Tensor, old: torch.Tensor, cumulative: torch.Tensor, coef: float) -> float:
    """Wrapper mode, after the base stepped ``param`` from ``old``: ``D = old − param``, then
    ``param = old + coef·D`` and ``C += coef·D`` in place; return ``⟨D, C_old⟩``. One loop for fp32."""
    if loop_ready(param, old, cumulative):
        fn = _loop_library().nup_rebase_update
        return fn(param.data_ptr(), old.data_ptr(), cumulative.data_ptr(), param.numel(), coef)
    d = old.float() - param.float()
    dot = float(torch.dot(d.reshape(-1), cumulative.float().reshape(-1)))
    param.copy_(old.float() + coef * d)
    cumulative.add_(d.to(cumulative.dtype), alpha=coef)
    return dot


def adam_moments(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 hyper: tuple[float, ...]) -> float:
    """A torch Adam/AdamW step's moment update in place, and ``‖D‖²`` of its direction (one loop; the
    caller checked :func:`loop_ready`). ``hyper`` is ``(sign, l2, 1−β1, β2, 1−β2, step_size, √bc2, eps,
    lr·wd_decoupled)``; ``D = step_size·m/(√v/√bc2 + eps) + lr·wd·P``, what torch's step subtracts."""
    fn = _loop_library().nup_adam_moments
    return fn(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), param.numel(), *hyper)


def adam_apply(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, cumulative: torch.Tensor,
               hyper: tuple[float, ...], coef: float) -> float:
    """``P += coef·D`` and ``C += coef·D`` along :func:`adam_moments`' direction (recomputed, same
    ``hyper``); returns ``⟨D, C_old⟩``. One loop over fp32 contiguous CPU tensors."""
    fn = _loop_library().nup_adam_apply
    return fn(param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), cumulative.data_ptr(), param.numel(),
              *hyper[5:], coef)


def folds_into_blas(act: Activation) -> bool:
    """True for the activations :class:`ScaledLinearAct` takes (``φ'`` read from ``y``, no custom φ)."""
    return act.name != "custom" and act.grad_from_output


def _zero(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·(a @ b)`` with α applied inside the GEMM (``addmm`` with ``beta=0``)."""
    return torch.addmm(_zero(a), a, b, beta=0.0, alpha=alpha)


def scaled_linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float, bias_scale: float,
    act: Activation,
) -> torch.Tensor:
    """``φ(α·x Wᵀ + bias_scale·b)``: one ``addmm``, then φ in place where it can be."""
    if bias is None:
        h = scaled_mm(x, weight.t(), alpha)
    else:
        h = torch.addmm(bias, x, weight.t(), beta=bias_scale, alpha=alpha)
    return h.relu_() if act.is_linear_abs and (act.a, act.b) == (0.5, 0.5) else act(h)  # identity: act(h) is h


class ScaledLinearAct(torch.autograd.Function):
    """``y = φ(α·x Wᵀ + bias_scale·b)`` on 2-D ``x`` ``(B, n_in)``, ``α`` folded into every GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha: float, bias_scale: float, act: Activation):
        y = scaled_linear_act_forward(x, weight, bias, alpha, bias_scale, act)
        linear = act.name != "tanh" and act.b == 0  # φ' is a constant: y is not needed (the readout)
        ctx.save_for_backward(x, weight, None if linear else y)
        ctx.alpha, ctx.bias_scale, ctx.act, ctx.has_bias = alpha, bias_scale, act, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        delta = output_delta(dy, y, ctx.act)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = scaled_mm(delta, weight, ctx.alpha) if need_x else None
        dw = scaled_mm(delta.t(), x, ctx.alpha) if need_w else None
        db = delta.sum(0).mul(ctx.bias_scale) if need_b and ctx.has_bias else None
        return dx, dw, db, None, None, None


def output_delta(dy: torch.Tensor, y: torch.Tensor, act: Activation) -> torch.Tensor:
    """``δ = dy ⊙ φ'`` with ``φ'`` read from ``y = φ(h)``, in dy's dtype (differentiable)."""
    if act.name == "tanh":
        return dy * (1.0 - y * y)
    slope_pos, slope_neg = act.a + act.b, act.a - act.b
    if slope_pos == slope_neg:
        return dy if slope_pos == 1.0 else dy * slope_pos
    if (slope_pos, slope_neg) == (1.0, 0.0):  # ReLU: one pass, and differentiable (for double backward)
        return torch.ops.aten.threshold_backward(dy, y, 0)
    return dy * torch.where(y > 0, slope_pos, slope_neg)
