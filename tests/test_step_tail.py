"""The step-tail kernel (nup_kernels.step_tail) against the torch path it replaces on CUDA.

``nup.step_core.finish_step`` and ``finish_from_norms`` run the torch ops under
``NUP_BACKEND=reference`` (the oracle) and one Triton launch under ``NUP_BACKEND=triton`` (here in
the interpreter). Both are driven with the same inputs for several steps, and every statistic,
``λ``, the clock and the controller state are compared after each step.
"""

import copy
import math

import pytest
import torch

from nup import step_core as core
from nup.launches import count_launches
from nup.schedule import (
    ConstantSchedule,
    GeometryAwareLR,
    RandomWalkLR,
    ReplaySchedule,
    SharpnessTargetLR,
    WarmupCosineSchedule,
)
from nup_kernels import step_tail
from nup_kernels.backend import tl, triton

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN and inf

TOL = dict(rtol=2e-6, atol=1e-7, equal_nan=True)  # fp32: the kernel's sums over tensors run in another order


class _LouderRandomWalk(RandomWalkLR):
    """A subclass that changes a formula: the kernel does not know it, so its update runs in torch."""

    def _signal(self, cos, update_norm, c_norm, active):
        return 2.0 * super()._signal(cos, update_norm, c_norm, active)


SCHEDULES = {
    "constant": ConstantSchedule,
    "geometry": RandomWalkLR,
    "geometry_per_layer": lambda: RandomWalkLR(per_layer=True),
    "geometry_warmup": lambda: RandomWalkLR(warmup=3),
    "geometry_clamps": lambda: RandomWalkLR(gain=50.0, max_change=0.7, min_mult=0.3, max_mult=1.5, beta=0.5),
    "geometry_clamps_per_layer": lambda: RandomWalkLR(
        gain=50.0, max_change=0.7, min_mult=0.3, max_mult=1.5, beta=0.5, per_layer=True
    ),
    "geometry_cosine": GeometryAwareLR,
    "geometry_cosine_per_layer": lambda: GeometryAwareLR(
        per_layer=True, warmup=2, gain=20.0, max_change=0.5, min_mult=0.2, max_mult=3.0
    ),
    "warmup_cosine": lambda: WarmupCosineSchedule(9, warmup=3, min_mult=0.1, peak=2.5),
    "warmup": lambda: WarmupCosineSchedule(None, warmup=4),
    "warmup_one": lambda: WarmupCosineSchedule(2, warmup=1, min_mult=0.0),  # ints equal to 1 are constexprs
    "replay": lambda: ReplaySchedule([0.5, 1.5, 2.0]),
    "sharpness": SharpnessTargetLR,
    "subclass": _LouderRandomWalk,
}


@pytest.fixture
def backend(monkeypatch):
    def use(name: str) -> None:
        monkeypatch.setenv("NUP_BACKEND", name)

    return use


def _stats(n: int, gen: torch.Generator) -> dict:
    g = {"step": 5}
    for key in ("update_norm", "cos", "lr"):
        g[key] = torch.randn(n, generator=gen)
    g["c_norm"] = torch.rand(n, generator=gen) * 3
    g["c_norm"][:: max(n // 3, 1)] = 0.0  # ‖C_t‖ = 0: cos 0
    g["path"] = torch.rand(n, generator=gen) * 10
    g["skipped"] = torch.randint(0, 4, (n,), generator=gen)
    return g


def _subset(n: int, step: int, gen: torch.Generator, subsets: bool) -> list[int]:
    if not subsets or step % 3 == 0:
        return list(range(n))
    keep = torch.rand(n, generator=gen) < 0.6
    keep[int(torch.randint(0, n, (1,), generator=gen))] = True
    return [i for i in range(n) if keep[i]]


def _step_inputs(g: dict, active: list[int], step: int, gen: torch.Generator, edges: bool) -> dict:
    """``finish_step``'s arguments as the optimizer forms them: ok, u (0 where skipped), ⟨ΔP, C⟩."""
    n, k = g["cos"].numel(), len(active)
    idx = core.active_index(active, n, torch.device("cpu"))
    eta = torch.rand(k, generator=gen) * 0.5
    ok = torch.rand(k, generator=gen) > 0.25
    if step == 4:
        ok[:] = False  # nothing moved: the clock and global controllers stand still
    u = torch.where(ok, eta * torch.rand(k, generator=gen) * 2, 0.0)
    c_old = core.pick(g["c_norm"], idx).clone()
    dot = torch.where(ok, (torch.rand(k, generator=gen) * 2 - 1) * u * c_old * 1.2, 0.0)  # some |cos| > 1: clamped
    if edges:
        u[0] = 0.0  # ok with η = 0: u·‖C‖ = 0
        if k > 2:
            dot[2] = float("inf") if ok[2] and u[2] * c_old[2] > 0 else dot[2]
        if k > 3 and step == 5:
            dot[3] = float("nan")  # NaN ⟨ΔP, C⟩ of a step that was taken: NaN cos, and what follows
    exact = torch.rand(k, generator=gen) * 4 if step % 4 == 2 else None
    return dict(idx=idx, eta=eta, ok=ok, u=u, dot=dot, c_norm_old=c_old, c_norm_exact=exact)


def _compare(ref_g, ref_s, ker_g, ker_s, where: str) -> None:
    assert ker_g["step"] == ref_g["step"], where
    for key in step_tail.STATISTICS:
        torch.testing.assert_close(ker_g[key], ref_g[key], **TOL, msg=lambda m, key=key: f"{where} {key}: {m}")
    assert ker_s.steps_done == ref_s.steps_done, where
    torch.testing.assert_close(ker_s.lam, ref_s.lam, **TOL, msg=lambda m: f"{where} λ: {m}")
    if ref_s.clock is not None:
        assert ker_s.clock is not None and ker_s.clock.dtype == torch.float64
        assert float(ker_s.clock) == float(ref_s.clock), where
    for name in ref_s._state_names:
        torch.testing.assert_close(getattr(ker_s, name), getattr(ref_s, name), **TOL,
                                   msg=lambda m, name=name: f"{where} {name}: {m}")  # fmt: skip


def _run(backend, name, n, subsets, edges, steps=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref_g = _stats(n, gen)
    ker_g = copy.deepcopy(ref_g)
    ref_s, ker_s = SCHEDULES[name](), SCHEDULES[name]()
    for s in (ref_s, ker_s):
        s.multiplier(n, "cpu")
    for step in range(steps):
        inputs = _step_inputs(ref_g, _subset(n, step, gen, subsets), step, gen, edges)
        backend("reference")
        core.finish_step(ref_g, schedule=ref_s, **copy.deepcopy(inputs))
        backend("triton")
        core.finish_step(ker_g, schedule=ker_s, **inputs)
        _compare(ref_g, ref_s, ker_g, ker_s, f"{name} n={n} step {step}")


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("subsets", [False, True], ids=["all", "idx"])
def test_kernel_tail_equals_the_torch_tail(backend, name, subsets):
    _run(backend, name, 7, subsets, edges=True)


@pytest.mark.parametrize("name", ["geometry", "geometry_per_layer", "geometry_cosine", "warmup_cosine"])
@pytest.mark.parametrize("n", [1, 300], ids=["one", "over-a-block"])
def test_kernel_tail_at_one_tensor_and_over_a_block(backend, name, n):
    _run(backend, name, n, subsets=n > 1, edges=False, steps=5, seed=n)


def _norm_inputs(n: int, slots: int, gen: torch.Generator, step: int) -> dict:
    """The fused path's ``[n]`` buffers, with ‖D‖ and rates that coefficients() skips."""
    d_norm = torch.rand(n, generator=gen) * 3
    eta = torch.rand(n, generator=gen) * 0.3
    scales = torch.rand(n, generator=gen) * 2 + 0.5
    normalize = torch.rand(n, generator=gen) > 0.3
    specials = [0.0, float("inf"), float("nan"), 1e-45, 3e38]
    for i, v in enumerate(specials[: n // 2]):
        d_norm[2 * i] = v
    if n > 12:
        eta[11], eta[12] = float("nan"), -0.1  # a NaN or negative rate: skipped
        eta[5], normalize[5] = 0.0, True  # u = 0, ok
        eta[7], scales[7], normalize[7] = 1e30, 1e30, True  # u over MAX_STEP: skipped
    sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)  # no cancellation: the sums' order
    dot = sign * torch.rand(n, slots, generator=gen) * 0.2 / slots  # differs, and rounds within TOL
    exact = None if step % 3 else torch.rand(n, generator=gen)
    return dict(rates=(eta, scales, normalize), d_norm=d_norm, dot=dot, c_norm_exact=exact)


@pytest.mark.parametrize(
    "name", ["constant", "geometry", "geometry_per_layer", "geometry_cosine", "warmup_cosine", "subclass"]
)  # subclass: coefficients and the dot sum in torch, then the tail kernel, then its update() in torch
@pytest.mark.parametrize("slots", [1, 3, 40])
@pytest.mark.parametrize("subsets", [False, True], ids=["all", "idx"])
def test_kernel_tail_from_norms_equals_coefficients_then_the_torch_tail(backend, name, slots, subsets):
    n = 20
    gen = torch.Generator().manual_seed(slots)
    ref_g = _stats(n, gen)
    ker_g = copy.deepcopy(ref_g)
    ref_s, ker_s = SCHEDULES[name](), SCHEDULES[name]()
    for step in range(5):
        active = _subset(n, step, gen, subsets)
        idx = core.active_index(active, n, torch.device("cpu"))
        inputs = _norm_inputs(n, slots, gen, step)
        if inputs["c_norm_exact"] is not None:
            inputs["c_norm_exact"] = inputs["c_norm_exact"][: len(active)]
        backend("reference")
        core.finish_from_norms(ref_g, idx, schedule=ref_s, **copy.deepcopy(inputs))
        backend("triton")
        core.finish_from_norms(ker_g, idx, schedule=ker_s, **inputs)
        _compare(ref_g, ref_s, ker_g, ker_s, f"{name} slots={slots} step {step}")


@pytest.mark.parametrize("name", ["constant", "geometry", "geometry_per_layer", "geometry_cosine", "warmup_cosine",
                                  "replay", "sharpness"])  # fmt: skip
def test_kernel_tail_is_one_launch_in_place(backend, name):
    backend("triton")
    gen = torch.Generator().manual_seed(1)
    g, sched = _stats(9, gen), SCHEDULES[name]()
    sched.multiplier(9, "cpu")
    inputs = _step_inputs(g, list(range(9)), 1, gen, edges=False)
    core.finish_step(g, schedule=sched, **inputs)  # the first step makes the controller's state

    def storage():
        tensors = [g[k] for k in step_tail.STATISTICS] + [sched.lam, sched.clock]
        tensors += [getattr(sched, name) for name in sched._state_names]
        return [t.data_ptr() for t in tensors if t is not None]

    before = storage()
    for step in (2, 3):
        inputs = _step_inputs(g, list(range(9)), step, gen, edges=False)
        with count_launches() as c:
            core.finish_step(g, schedule=sched, **inputs)
        assert c.torch_ops == [] and c.triton == ["_step_tail_kernel"], (c.torch_ops, c.triton)
    assert storage() == before  # state kept in place: a captured step reads what the last one wrote


def test_kernel_tail_state_round_trips_through_a_state_dict(backend):
    """A schedule loaded from a checkpoint (CPU tensors, the old clock-less format) continues as the torch one."""
    backend("triton")
    gen = torch.Generator().manual_seed(3)
    g, sched = _stats(6, gen), RandomWalkLR(per_layer=True)
    sched.multiplier(6, "cpu")
    for step in range(3):
        core.finish_step(g, schedule=sched, **_step_inputs(g, list(range(6)), step, gen, edges=False))
    saved = sched.state_dict()
    ref, ker = RandomWalkLR(per_layer=True), RandomWalkLR(per_layer=True)
    ref.load_state_dict(saved)
    ker.load_state_dict(saved)
    ref_g, ker_g = copy.deepcopy(g), copy.deepcopy(g)
    for step in range(3, 6):
        inputs = _step_inputs(ref_g, list(range(6)), step, gen, edges=False)
        backend("reference")
        core.finish_step(ref_g, schedule=ref, **copy.deepcopy(inputs))
        backend("triton")
        core.finish_step(ker_g, schedule=ker, **inputs)
        _compare(ref_g, ref, ker_g, ker, f"resumed step {step}")


def test_the_kernel_records_the_statistic_vectors_nup_keeps():
    assert step_tail.STATISTICS == core.STAT_VECTORS


def test_controller_refuses_what_the_kernel_cannot_run():
    lam = torch.ones(3)
    with pytest.raises(ValueError, match="unknown controller"):
        step_tail.Controller("sgdr", lam)
    with pytest.raises(ValueError, match="3 state vectors"):
        step_tail.Controller("random_walk", lam, torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="needs its clock"):
        step_tail.Controller("warmup_cosine", lam)
    assert math.isclose(step_tail.Controller("none", lam).peak, 1.0)


@triton.jit
def _div_sqrt_kernel(x, y, q, r, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    a = tl.load(x + i, mask=m, other=1.0)
    b = tl.load(y + i, mask=m, other=1.0)
    tl.store(q + i, step_tail._div(a, b), mask=m)
    tl.store(r + i, step_tail._sqrt(tl.abs(a)), mask=m)


def test_division_and_square_root_round_as_ieee_bit_for_bit():
    """The kernel's call-free fp32 ``x / y`` and ``sqrt`` are the correctly rounded ones, specials included."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    x, y = (torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen).to(torch.int32).view(torch.float32).clone()
            for _ in range(2))  # random bit patterns: every exponent, subnormals, inf, NaN  # fmt: skip
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3.4028235e38, 1.0, 3.0, 1e-38])
    m = len(special)
    x[: m * m], y[: m * m] = special.repeat(m), special.repeat_interleave(m)
    x[200:1200], y[200:1200] = torch.rand(1000, generator=gen) * 2 - 1, torch.rand(1000, generator=gen)
    q, r = torch.empty(n), torch.empty(n)
    _div_sqrt_kernel[(1,)](x, y, q, r, n, BLOCK=n)

    def same(a, b):
        return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())

    assert same(q, x / y)
    assert same(r, x.abs().double().sqrt().float())  # IEEE (torch's own CPU fp32 sqrt is off by 1 ulp at times)
