"""What the benchmark suites share: cases, providers, the step builders and the machine record.

A *step* is one full training step on a batch: ``zero_grad``, forward, cross-entropy loss,
backward and the optimizer step. Providers (what a user would pick, side by side):

- ``plain_torch``: ``nn.Linear`` (``F.linear``) + ReLU, autograd, ``torch.optim.SGD(foreach=True)``;
  no statistics; the same function as the NuMLP (:func:`plain_mlp`). The baseline of every ratio.
- ``numlp_sgd``: the same :class:`nup.NuMLP` as the nup providers, with ``torch.optim.SGD``;
  separates the model's cost from the statistics' cost.
- ``nup_dropin``: ``NuMLP`` + :class:`nup.NuP` (statistics on); the reference foreach path on
  CPU, the multi-tensor Triton kernels on CUDA.
- ``nup_fused``: ``NuMLP`` + ``NuP(fused=True)``, update inside the backward (Triton on CUDA, BLAS
  and the one-loop update on CPU).
- ``nup_dropin_compiled``: ``nup_dropin`` with ``torch.compile(opt.step, fullgraph=True)``.
- ``adam`` and ``nup_wrapper_adam``: ``NuMLP`` + ``torch.optim.Adam(foreach=True)``, alone and as the
  base of ``NuP(base=Adam)`` (wrapper mode), so wrapper mode is measured against its base;
  ``adam_fused`` and ``nup_wrapper_adam_fused`` the same with ``Adam(fused=True)`` (torch's one-kernel
  step, the fastest torch Adam on CPU).
- ``unfused_stats``: the plain torch model and :func:`unfused_stats_step`, the same statistics
  written per tensor in plain PyTorch.
- ``compiled_stats``: ``torch.compile(unfused_stats_step)``.

Times are seconds; ``bytes`` are the modelled parameter traffic of :mod:`nup_kernels.traffic`
(weights only, activations not counted) and ``flops`` the matmul FLOPs ``6·B·P`` of a step.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nup import NuMLP, NuP
from nup.optim import default_scale
from nup_kernels.apply_update import choose_update_path
from nup_kernels.traffic import model_traffic

IN_FEATURES, OUT_FEATURES = 256, 10
LR = 1e-3
STEP_BASELINE = "plain_torch"
STEP_PROVIDERS = (
    "plain_torch", "numlp_sgd", "nup_dropin", "nup_dropin_compiled", "nup_fused", "adam", "nup_wrapper_adam",
    "adam_fused", "nup_wrapper_adam_fused", "unfused_stats", "compiled_stats",
)  # fmt: skip
#: provider -> the provider it is measured against besides plain torch (the targets of issue #9)
STEP_REFERENCES = {
    "numlp_sgd": "plain_torch", "nup_dropin": "numlp_sgd", "nup_dropin_compiled": "numlp_sgd",
    "nup_fused": "numlp_sgd", "nup_wrapper_adam": "adam", "nup_wrapper_adam_fused": "adam_fused",
}  # fmt: skip
#: provider -> the provider it must not be slower than (issue #9: the fused path never slower than drop-in),
#: timed in pairs with it so the comparison does not go through two separately drifting ratios
STEP_RIVALS = {"nup_fused": "nup_dropin"}
#: providers whose step is compiled by torch.compile (left out of the launch count and of quick CPU runs)
COMPILED_PROVIDERS = ("nup_dropin_compiled", "compiled_stats")
#: depth -> (m, max_width): νP widths ``m·k²``; m chosen so the models have 0.7M–3.3M parameters
STEP_MODELS = {4: (128, None), 16: (4, None), 64: (1, 256)}
STEP_BATCHES = (32, 256, 2048)
QUICK_STEP_MODELS = {4: (4, None), 16: (1, None)}
QUICK_STEP_BATCHES = (16,)


class Unavailable(Exception):
    """A provider that cannot run here; the message is the skip reason."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """Device name, core count, thread count, library versions and the load average (1, 5, 15 min)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------------
# steps


@dataclass(frozen=True)
class StepCase:
    """One model and batch size; ``widths`` are the νP widths ``[n_0, …, n_L]``."""

    depth: int
    m: int
    max_width: int | None
    batch: int

    @property
    def name(self) -> str:
        return f"depth{self.depth}-b{self.batch}"

    def model(self) -> NuMLP:
        return NuMLP(IN_FEATURES, OUT_FEATURES, self.depth, self.m, max_width=self.max_width)

    def flops(self, widths: list[int]) -> int:
        """Matmul FLOPs of one step: ``2·B·P`` forward, ``4·B·P`` backward."""
        return 6 * self.batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def step_cases(models: dict[int, tuple[int, int | None]], batches: tuple[int, ...]) -> list[StepCase]:
    return [StepCase(d, m, cap, b) for d, (m, cap) in models.items() for b in batches]


def plain_mlp(numlp: NuMLP) -> nn.Sequential:
    """``nn.Linear`` (no bias) + ReLU layers computing the same function as ``numlp`` (bias-free, ReLU).

    Each layer's weight is ``α·W`` of the NuMLP layer, so both models see the same magnitudes
    (nn.Linear's default init would shrink the signal by ~6× per layer, to ~1e-25 at depth 64).
    """
    layers: list[nn.Module] = []
    for layer in numlp.layers:
        linear = nn.Linear(layer.fan_in, layer.fan_out, bias=False)
        with torch.no_grad():
            linear.weight.copy_(layer.alpha * layer.weight)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@torch.no_grad()
def unfused_stats_step(
    params: list[torch.Tensor], cumulatives: list[torch.Tensor], lr: float, scales: list[float]
) -> dict[str, torch.Tensor]:
    """The νP-SGD step with statistics as plain PyTorch, one tensor at a time, after ``backward``.

    Per tensor: ``g.norm()``, ``(g*c).sum()``, ``c.norm()``, then ``p += coef·g`` and
    ``c += coef·g`` with ``coef = −lr·s/‖g‖``. Returns fp32 ``[n]`` vectors: ``grad_norm``, the
    cosine ``cos`` between the update and ``C`` before it, and that ``c_norm``. No host sync.
    """
    g_norms, cosines, c_norms = [], [], []
    for p, c, s in zip(params, cumulatives, scales):
        g = p.grad
        g_norm = g.norm()
        gc = (g * c).sum()
        c_norm = c.norm()
        coef = -lr * s / g_norm.clamp_min(1e-30)
        p.addcmul_(g, coef)
        c.addcmul_(g, coef)
        g_norms.append(g_norm)
        cosines.append(-gc / (g_norm * c_norm).clamp_min(1e-30))
        c_norms.append(c_norm)
    return {"grad_norm": torch.stack(g_norms), "cos": torch.stack(cosines), "c_norm": torch.stack(c_norms)}


_compiled_stats_step = None


def compiled_stats_step() -> Callable[..., dict[str, torch.Tensor]]:
    """``torch.compile(unfused_stats_step)``, one object per process (recompiles per set of shapes)."""
    global _compiled_stats_step
    if _compiled_stats_step is None:
        _compiled_stats_step = torch.compile(unfused_stats_step)
    return _compiled_stats_step


@dataclass
class Step:
    """A ready-to-time training step and what the record says about it."""

    run: Callable[[], None]
    impl: str
    traffic_path: str
    widths: list[int]
    setup_s: float = 0.0


def _data(case: StepCase, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, IN_FEATURES, generator=gen).to(dev)
    y = torch.randint(0, OUT_FEATURES, (case.batch,), generator=gen).to(dev)
    return x, y


def _with_optimizer(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def _with_stats(model: nn.Module, stats_step: Callable, x, y) -> Callable[[], None]:
    params = list(model.parameters())
    cumulatives = [torch.zeros_like(p) for p in params]
    scales = [default_scale(p) for p in params]

    def run() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        stats_step(params, cumulatives, LR, scales)

    return run


class _CompiledStep:
    """``zero_grad`` and ``torch.compile(opt.step, fullgraph=True)`` of an optimizer, as ``_with_optimizer`` wants."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.compiled = opt, torch.compile(opt.step, fullgraph=True)
        self.steps = 0

    def step(self) -> None:
        (self.compiled if self.steps else self.opt.step)()  # the first step, eager, makes NuP's state
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)


def _compiled(step: Step, dev: torch.device) -> Step:
    """Run a compiled step once (compiling it) and record the seconds that took; a failure is a skip."""
    start = time.perf_counter()
    try:
        step.run()
        synchronize(dev)
    except Exception as err:  # any compile failure is a skip reason
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise Unavailable(f"torch.compile failed: {type(err).__name__}: {first_line}") from err
    step.setup_s = time.perf_counter() - start
    return step


def build_step(provider: str, case: StepCase, dev: torch.device) -> Step:
    """The training step of ``provider`` on ``case``; raises :class:`Unavailable` when it cannot run."""
    torch.manual_seed(0)
    x, y = _data(case, dev)
    numlp = case.model().to(dev)
    widths = numlp.widths
    backend = "triton" if dev.type == "cuda" else "reference"
    if provider == "plain_torch":
        model = plain_mlp(numlp).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=True)
        return Step(_with_optimizer(model, opt, x, y), "torch", "plain_sgd", widths)
    if provider == "numlp_sgd":
        opt = torch.optim.SGD(numlp.parameters(), lr=LR, foreach=True)
        return Step(_with_optimizer(numlp, opt, x, y), f"numlp-{backend}", "plain_sgd", widths)
    if provider == "nup_dropin":
        opt = NuP(numlp.named_parameters(), lr=LR)
        return Step(_with_optimizer(numlp, opt, x, y), backend, "unfused_stats", widths)
    if provider == "nup_dropin_compiled":
        opt = NuP(numlp.named_parameters(), lr=LR)
        compiled = _CompiledStep(opt)
        return _compiled(Step(_with_optimizer(numlp, compiled, x, y), "torch.compile", "unfused_stats", widths), dev)
    if provider == "nup_fused":
        opt = NuP(numlp.named_parameters(), lr=LR, fused=True)
        path = choose_update_path(case.batch, numlp.widths[1], numlp.widths[0], torch.float32, dev)
        return Step(_with_optimizer(numlp, opt, x, y), f"{backend}-fused", f"fused_{path}", widths)
    if provider in ("adam", "nup_wrapper_adam", "adam_fused", "nup_wrapper_adam_fused"):
        kind = {"fused": True} if provider.endswith("fused") else {"foreach": True}
        base = torch.optim.Adam(numlp.parameters(), lr=LR, **kind)
        opt = base if provider.startswith("adam") else NuP(numlp.named_parameters(), lr=LR, base=base)
        return Step(_with_optimizer(numlp, opt, x, y), f"numlp-{backend}", "unfused_stats", widths)
    model = plain_mlp(numlp).to(dev)
    if provider == "unfused_stats":
        return Step(_with_stats(model, unfused_stats_step, x, y), "torch", "unfused_stats", widths)
    if provider == "compiled_stats":
        run = _with_stats(model, compiled_stats_step(), x, y)
        return _compiled(Step(run, "torch.compile", "unfused_stats", widths), dev)
    raise ValueError(f"unknown step provider {provider!r}; choose one of {STEP_PROVIDERS}")


def step_record(case: StepCase, provider: str, step: Step) -> dict[str, object]:
    """``extra_info`` of a step benchmark: what the post-processing needs to compute rates and ratios."""
    widths = step.widths
    traffic = model_traffic(widths, step.traffic_path, batch=case.batch)
    return {
        "suite": "steps", "case": case.name, "provider": provider, "baseline": STEP_BASELINE,
        "reference": STEP_REFERENCES.get(provider), "rival": STEP_RIVALS.get(provider),
        "impl": step.impl, "depth": case.depth, "batch": case.batch, "m": case.m, "max_width": case.max_width,
        "widths": widths, "n_params": traffic["n_params"], "traffic_path": step.traffic_path,
        "bytes": traffic["bytes"], "flops": case.flops(widths), "setup_s": round(step.setup_s, 3),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# options and timing


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def options_from(config) -> dict:
    """Timing options (warm-up calls, timed seconds per benchmark, rounds' bounds) and the step grid,
    from the ``--nup-*`` options of a pytest config (see ``benchmarks/conftest.py``)."""
    quick = config.getoption("--nup-quick")
    budget = config.getoption("--nup-budget")
    skip = [s.lower().split("x") for s in config.getoption("--nup-skip").split(",") if s.strip()]
    return {
        "quick": quick,
        "warmup": 1 if quick else 2,
        "budget_s": budget if budget is not None else (0.05 if quick else 3.0),
        "min_rounds": 2 if quick else 5,
        "max_rounds": 5 if quick else 200,
        "depths": _ints(config.getoption("--nup-depths")),
        "batches": _ints(config.getoption("--nup-batches")),
        "skip": {(int(d), int(b)) for d, b in skip},
    }


def selected_step_cases(options: dict) -> list[StepCase]:
    """The step grid after ``--nup-quick``, ``--nup-depths``, ``--nup-batches`` and ``--nup-skip``."""
    models = QUICK_STEP_MODELS if options["quick"] else STEP_MODELS
    unknown = set(options["depths"]) - set(models)
    if unknown:
        raise ValueError(f"no step model for depth(s) {sorted(unknown)}; choose from {sorted(models)}")
    if options["depths"]:
        models = {d: models[d] for d in options["depths"]}
    batches = options["batches"] or (QUICK_STEP_BATCHES if options["quick"] else STEP_BATCHES)
    return [c for c in step_cases(models, batches) if (c.depth, c.batch) not in options["skip"]]


def rounds_for(seconds_per_call: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many timed rounds fit ``budget_s``, clamped to ``[min_rounds, max_rounds]``."""
    return max(min_rounds, min(max_rounds, int(budget_s / max(seconds_per_call, 1e-9))))


def time_once(fn: Callable[[], object], dev: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(dev)
    return time.perf_counter() - start


def paired_ratio(
    fn: Callable[[], object], baseline: Callable[[], object], dev: torch.device, rounds: int
) -> float:
    """Median over ``rounds`` of ``time(fn) / time(baseline)``, each pair timed back to back.

    The order alternates within pairs. Load from other processes that comes and goes then hits
    both calls of a pair alike, so this ratio is steadier than a ratio of separate medians on a
    shared machine (each call finds the other's tensors in cache, which both pay equally).
    """
    return statistics.median(paired_ratios(fn, baseline, dev, rounds))


def paired_ratios(
    fn: Callable[[], object], baseline: Callable[[], object], dev: torch.device, rounds: int
) -> list[float]:
    """The ``rounds`` ratios ``time(fn) / time(baseline)`` of :func:`paired_ratio`, in timing order."""
    ratios = []
    for i in range(rounds):
        if i % 2:
            base = time_once(baseline, dev)
            ratios.append(time_once(fn, dev) / base)
        else:
            t = time_once(fn, dev)
            ratios.append(t / time_once(baseline, dev))
    return ratios


def run_benchmark(
    benchmark,
    fn: Callable[[], object],
    dev: torch.device,
    options: dict,
    extra: dict,
    baseline: Callable[[], object] | None = None,
    reference: Callable[[], object] | None = None,
    rival: Callable[[], object] | None = None,
) -> None:
    """Warm ``fn`` up, pick the rounds from ``options['budget_s']`` and time it with pytest-benchmark.

    With ``baseline`` (the same case's baseline provider), also record ``paired_ratio``
    (:func:`paired_ratio`, over the same number of rounds); the baseline itself records 1.0. With
    ``reference`` (the provider's own reference, :data:`STEP_REFERENCES`), likewise
    ``paired_ratio_ref``: the ratio the targets are stated in, immune to drift between providers. With
    ``rival`` (:data:`STEP_RIVALS`), ``paired_ratio_rival`` and its quartiles ``paired_ratio_rival_q``.
    """

    def call() -> None:
        fn()
        synchronize(dev)

    for _ in range(options["warmup"]):
        call()
    per_call = min(time_once(fn, dev) for _ in range(2))
    rounds = rounds_for(per_call, options["budget_s"], options["min_rounds"], options["max_rounds"])
    benchmark.extra_info.update(extra)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    if baseline is None:
        benchmark.extra_info["paired_ratio"] = 1.0
    else:
        for _ in range(options["warmup"]):
            time_once(baseline, dev)
        benchmark.extra_info["paired_ratio"] = paired_ratio(fn, baseline, dev, rounds)
    if reference is not None:
        for _ in range(options["warmup"]):
            time_once(reference, dev)
        benchmark.extra_info["paired_ratio_ref"] = paired_ratio(fn, reference, dev, rounds)
    if rival is not None:
        for _ in range(options["warmup"]):
            time_once(rival, dev)
        q1, median, q3 = statistics.quantiles(paired_ratios(fn, rival, dev, max(rounds, 4)), n=4)
        benchmark.extra_info["paired_ratio_rival"] = median
        benchmark.extra_info["paired_ratio_rival_q"] = [q1, q3]
    if hasattr(os, "getloadavg"):  # other work on the machine skews the times: keep the evidence
        benchmark.extra_info["load_avg_1m"] = round(os.getloadavg()[0], 2)
