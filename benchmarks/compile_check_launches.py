"""Discover every Triton launch the package makes, by running its public launchers under the interpreter.

Run as a script (``TRITON_INTERPRET=1`` and ``NUP_BACKEND=triton`` are set here before triton is
imported); it prints one JSON list of launches on stdout. A launch is a kernel (module and name),
its arguments as Triton signature types with their values, its constexprs, ``num_warps`` and
``num_stages``, whether an autotuner chose the config, and the dtypes of the tensor arguments (what
the autotuner's ``early_config_prune`` reads). Kernels added later are found without registering
them, as long as a workload below reaches them: every public launcher in fp32 (TF32 off and on),
bf16 and fp16, the step tail with every schedule the kernel runs, and a fused NuMLP + NuP training
step on both update paths.

Shapes are multiples of 16 (aligned), so integer arguments carry the specialization Triton gives
aligned shapes; :mod:`compile_check_aot` derives the unaligned variant from them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"
os.environ["NUP_BACKEND"] = "triton"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import autotuner, interpreter  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip
#: fp32 matmul settings the dispatcher honours: "ieee" (TF32 off) and "tf32"
PRECISIONS = {"ieee": "highest", "tf32": "high"}


def _sig(value: Any) -> tuple[str, Any]:
    """(Triton signature type, JSON value) of one kernel argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype], None
    if isinstance(value, bool):
        return "i1", value
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value
    if isinstance(value, float):
        return "fp32", value
    if value is None:
        return "constexpr", None
    raise TypeError(f"unrecorded kernel argument type {type(value)}")


class Recorder:
    """Patches the interpreter's launch and the autotuner's run; both still execute the kernel."""

    def __init__(self) -> None:
        self.launches: dict[str, dict[str, Any]] = {}
        self.tag = ""
        self._local = threading.local()

    def _record(self, fn: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        names = list(fn.arg_names)
        bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        constexprs = {p.name for p in _params(fn) if p.is_constexpr}
        tuner = getattr(self._local, "tuner", None)
        tuned = set(tuner.configs[0].kwargs) if tuner is not None else set()
        entry: dict[str, Any] = {
            "module": fn.fn.__module__,
            "kernel": fn.fn.__name__,
            "autotuned": tuner is not None,
            "signature": {},
            "values": {},
            "constexprs": {},
            "dtypes": {},
            "num_warps": kwargs.get("num_warps", 4),
            "num_stages": kwargs.get("num_stages", 3),
        }
        for name in names:
            value = bound.get(name)
            if name in constexprs:
                if name not in tuned:
                    entry["constexprs"][name] = _constexpr_json(value)
                continue
            kind, jvalue = _sig(value)
            entry["signature"][name] = kind
            entry["values"][name] = jvalue
            if isinstance(value, torch.Tensor):
                entry["dtypes"][name] = str(value.dtype).removeprefix("torch.")
        if tuner is not None:
            entry.pop("num_warps"), entry.pop("num_stages")
        key = json.dumps({k: entry[k] for k in ("module", "kernel", "signature", "constexprs")}, sort_keys=True)
        key += json.dumps({k: v for k, v in entry["values"].items() if v == 1 or v is None}, sort_keys=True)
        if key not in self.launches:
            entry["first_seen"] = self.tag
            self.launches[key] = entry

    @contextmanager
    def installed(self) -> Iterator[None]:
        run_interpreted, run_tuned = interpreter.InterpretedFunction.run, autotuner.Autotuner.run
        recorder = self

        def interpreted(fn, *args, grid, warmup, **kwargs):
            recorder._record(fn, args, kwargs)
            return run_interpreted(fn, *args, grid=grid, warmup=warmup, **kwargs)

        def tuned(tuner, *args, **kwargs):
            recorder._local.tuner = tuner
            try:
                return run_tuned(tuner, *args, **kwargs)
            finally:
                recorder._local.tuner = None

        interpreter.InterpretedFunction.run, autotuner.Autotuner.run = interpreted, tuned
        try:
            yield
        finally:
            interpreter.InterpretedFunction.run, autotuner.Autotuner.run = run_interpreted, run_tuned


def _params(fn: Any) -> list[Any]:
    """The kernel's parameters with ``name`` and ``is_constexpr`` (the interpreter keeps the plain function)."""
    import inspect

    out = []
    for p in inspect.signature(fn.fn).parameters.values():
        is_constexpr = p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation)
        out.append(type("P", (), {"name": p.name, "is_constexpr": is_constexpr}))
    return out


def _constexpr_json(value: Any) -> Any:
    """A constexpr as JSON: numbers and bools as is, Triton dtypes as ``"tl.<name>"``."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "value"):  # tl.constexpr
        return _constexpr_json(value.value)
    return f"tl.{value}"


def _layer_ops(dtype: torch.dtype, act: str, bias: bool, batch: int = 32, n_in: int = 48, n_out: int = 64) -> None:
    """Every public launcher of one layer: forward, δ, dx, dW (δ recomputed and given), bias grad, Gram norm,
    apply (both paths and the bias), multi-tensor."""
    from nup_kernels import apply_update, gram_norm, linear_act, multi_tensor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_in, generator=g).to(dtype)
    w = torch.randn(n_out, n_in, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    y, saved = linear_act.linear_act_forward(x, w, b, 0.5, 1.0, act)
    dy = torch.randn_like(y)
    delta = linear_act.activation_delta(dy, saved, act)
    linear_act.linear_act_backward_dx(dy, saved, w, 0.5, act, out_dtype=dtype)
    linear_act.linear_act_backward_dw(dy, saved, x, 0.5, act)
    if bias:
        linear_act.linear_act_bias_grad(dy, saved, 1.0, act)
    linear_act.linear_act_backward_delta_dx(dy, saved, w, 0.5, act, dtype)
    linear_act.linear_act_backward_dx(dy, saved, w, 0.5, act, out_dtype=dtype, delta=delta)
    linear_act.linear_act_backward_dw(dy, saved, x, 0.5, act, delta=delta)
    gram_norm.grad_norm_sq_gram(x, delta.to(dtype), 0.5)
    gram_norm.grad_norm_sq_partials(x, delta, 0.5)
    for copies in (2, 3):  # batches 64 and 96: 64-row tiles, one tile and several
        gram_norm.grad_norm_sq_partials(torch.cat([x] * copies), torch.cat([delta] * copies), 0.5)
    coef = torch.full((1,), -0.01)
    g_full = torch.randn(n_out, n_in, generator=g)
    c = torch.zeros_like(w)
    apply_update.apply_update(w, c, coef, grad=g_full)
    apply_update.apply_update(w, c, coef, x=x, delta=delta, alpha=0.5)
    apply_update.apply_update(w, c, coef, x=x, delta=delta.to(dtype), alpha=0.5)
    if dtype == torch.float32:
        apply_update.apply_update(w, w.clone(), coef, grad=g_full, cumulative_is_init=True)
    if bias:
        rates = torch.tensor([[0.1, 0.0]])
        apply_update.apply_bias_update(b, torch.zeros_like(b), delta, 1.0, 0, rates=rates,
                                       d_norm_out=torch.zeros(1), dot_out=torch.zeros(1))
    ds = [torch.randn(n_out, n_in, generator=g).to(dtype), torch.randn(n_out, generator=g).to(dtype)]
    cs = [torch.randn_like(d) for d in ds]
    multi_tensor.multi_tensor_reduce(ds, cs)
    multi_tensor.multi_tensor_apply([d.clone() for d in ds], ds, cs, torch.full((2,), -0.01))
    multi_tensor.multi_tensor_reduce([d.float() for d in ds], cs)


def _step_tail_ops() -> None:
    """The step-tail launchers with every controller kind (global and per layer), with and without an
    ``idx`` subset and an exact ``‖C‖``, from given statistics and from the fused path's norms."""
    from nup.schedule import ReplaySchedule, make_schedule
    from nup.step_core import active_index, global_state
    from nup_kernels import step_tail

    n = 48
    g = torch.Generator().manual_seed(0)
    for name, warmup in (("constant", 0), ("geometry", 0), ("geometry", 2), ("geometry_per_layer", 0),
                         ("geometry_per_layer", 2), ("geometry_cosine", 2), ("geometry_cosine_per_layer", 2),
                         ("warmup_cosine", 2), ("warmup", 2), ("geometry_sharpness", 0)):  # fmt: skip
        sched = make_schedule(name, total_steps=100, warmup=warmup)
        for subset, exact in ((False, False), (True, True)):
            active = list(range(0, n, 3)) if subset else list(range(n))
            idx, k = active_index(active, n, torch.device("cpu")), len(active)
            stats = global_state({}, n, torch.device("cpu"))
            controller = sched.kernel_update(n, "cpu")
            c = torch.rand(k, generator=g) if exact else None
            eta, u = torch.rand(k, generator=g), torch.rand(k, generator=g)
            step_tail.finish_step(stats, idx, eta, u > 0.2, u, torch.randn(k, generator=g), torch.rand(k, generator=g),
                                  c, controller)  # fmt: skip
            rates = (torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g) > 0.5)
            step_tail.finish_from_norms(stats, idx, *rates, torch.rand(n, generator=g), torch.randn(n, 16, generator=g),
                                        1e19, c, sched.kernel_update(n, "cpu"))  # fmt: skip
    sched = ReplaySchedule([1.0, 0.5])
    stats = global_state({}, n, torch.device("cpu"))
    u = torch.rand(n, generator=g)
    step_tail.finish_step(stats, None, u, u > 0.2, u, u, u, None, sched.kernel_update(n, "cpu"))


def _fused_step(dtype: torch.dtype, path: str, batch: int) -> None:
    """Two steps of a depth-3 NuMLP with NuP(fused=True), and one with the drop-in NuP."""
    from nup.model import NuMLP
    from nup.optim import NuP

    for fused in (True, False):
        torch.manual_seed(0)
        model = NuMLP(16, 16, depth=3, m=16).to(dtype)
        opt = NuP(model.parameters(), lr=0.1, fused=fused)
        x, target = torch.randn(batch, 16).to(dtype), torch.randn(batch, 16).to(dtype)
        os.environ["NUP_UPDATE_PATH"] = path
        try:
            for _ in range(2):
                loss = torch.nn.functional.mse_loss(model(x).float(), target.float())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            os.environ.pop("NUP_UPDATE_PATH", None)


def discover() -> list[dict[str, Any]]:
    """Every distinct launch of the workloads, in first-seen order."""
    recorder = Recorder()
    with recorder.installed():
        for prec_name, level in PRECISIONS.items():
            torch.set_float32_matmul_precision(level)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                if dtype != torch.float32 and prec_name != "ieee":
                    continue
                for act, bias in (("relu", False), ("gelu", True)):  # φ' from y, and from h with erf
                    recorder.tag = f"layer {str(dtype)[6:]} {prec_name} {act}"
                    _layer_ops(dtype, act, bias)
                for path in ("small_batch", "materialized"):
                    recorder.tag = f"fused_step {str(dtype)[6:]} {prec_name} {path}"
                    _fused_step(dtype, path, 16)
        recorder.tag = "step_tail"
        _step_tail_ops()
        torch.set_float32_matmul_precision("highest")
    return list(recorder.launches.values())


if __name__ == "__main__":
    json.dump({"triton": triton.__version__, "launches": discover()}, sys.stdout)
