"""Full training steps (forward, loss, backward, optimizer step) at depth × batch, per provider.

Every case runs each provider of :data:`common.STEP_PROVIDERS` back to back, so the ratios to
``plain_torch`` come from one run; each provider also times pairs of (its step, a plain-torch
step) for the paired ratio of :func:`common.paired_ratio`, and pairs with its own reference
(:data:`common.STEP_REFERENCES`) for the paired ratio the targets are stated in, and the fused step with
drop-in (:data:`common.STEP_RIVALS`), which it must not be slower than. In quick mode the compiled providers
skip on CPU, where compiling takes about a minute.
"""

from __future__ import annotations

import common
import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "step_case" in metafunc.fixturenames:
        cases = common.selected_step_cases(common.options_from(metafunc.config))
        pairs = [(c, p) for c in cases for p in common.STEP_PROVIDERS]
        metafunc.parametrize("step_case,provider", pairs, ids=[f"{c.name}-{p}" for c, p in pairs])


def test_step(benchmark, step_case: common.StepCase, provider: str, bench_options: dict) -> None:
    dev = common.device()
    if provider in common.COMPILED_PROVIDERS and bench_options["quick"] and dev.type == "cpu":
        pytest.skip("quick mode leaves out torch.compile on CPU (compiling takes about a minute)")
    try:
        step = common.build_step(provider, step_case, dev)
    except common.Unavailable as err:
        pytest.skip(str(err))
    extra = common.step_record(step_case, provider, step)
    baseline = (
        None if provider == common.STEP_BASELINE else common.build_step(common.STEP_BASELINE, step_case, dev)
    )
    ref_name = common.STEP_REFERENCES.get(provider)
    reference = None if ref_name is None else common.build_step(ref_name, step_case, dev)
    rival_name = common.STEP_RIVALS.get(provider)
    rival = None if rival_name is None else common.build_step(rival_name, step_case, dev)
    common.run_benchmark(
        benchmark, step.run, dev, bench_options, extra, baseline and baseline.run, reference and reference.run,
        rival and rival.run,
    )
