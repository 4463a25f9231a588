"""Learning-rate multipliers (SPEC §4): GeometryAwareLR against a scalar transcription of the
SPEC recursion, the warm-up/cosine schedule, and make_schedule."""

import io
import math

import numpy as np
import pytest
import torch

from nup import ConstantSchedule, GeometryAwareLR, RandomWalkLR, WarmupCosineSchedule, make_schedule


def spec_lambdas(cos, norms=None, target=0.1, gain=0.5, beta=0.9, delta=0.05, lo=1e-3, hi=1e3, warmup=0):
    """λ_t used at steps t = 0 … T−1 for the scalar sequence ``cos`` (SPEC §4, c̃ starts at 0).

    A step with update norm 0 (``norms[t] == 0``) leaves λ and c̃ as they are.
    """
    ema, lam, out = 0.0, 1.0, []
    for t, c in enumerate(cos):
        out.append(lam)
        if norms is not None and norms[t] == 0:
            continue
        ema = beta * ema + (1 - beta) * c
        if t + 1 < warmup:
            lam = 1.0
        else:
            lam = min(hi, max(lo, lam * math.exp(min(delta, max(-delta, gain * (ema - target))))))
    return np.array(out)


def drive(sched, cos, norms=None) -> np.ndarray:
    """Feed rows of per-tensor cosines (and update norms, default 1); return λ_t, shape (T, n)."""
    cos = np.asarray(cos, dtype=np.float32)
    norms = np.ones_like(cos) if norms is None else np.asarray(norms, dtype=np.float32)
    out = []
    for c, u in zip(cos, norms):
        lam = sched.multiplier(len(c), "cpu")
        assert lam.dtype == torch.float32 and lam.shape == (len(c),)
        out.append(lam.double().numpy().copy())
        sched.update(torch.from_numpy(c), torch.from_numpy(u))
    return np.stack(out)


def as_fp32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


# ----------------------------------------------------------------------------- GeometryAwareLR


def test_constant_high_cosine_grows_by_exp_delta_up_to_max():
    lam = drive(GeometryAwareLR(), np.full((200, 2), 0.9))
    ref = spec_lambdas(as_fp32(np.full(200, 0.9)))
    np.testing.assert_allclose(lam[:, 0], ref, rtol=1e-4)
    assert np.array_equal(lam[:, 0], lam[:, 1])  # global mode: one value everywhere
    # c̃ = 0.9·(1 − 0.9^{t+1}) ≥ 0.2 from t = 2 on, so the exponent is clipped at δ from then.
    ratios = lam[1:, 0] / lam[:-1, 0]
    assert ratios[0] == pytest.approx(math.exp(0.5 * (0.09 - 0.1)), rel=1e-6)
    assert ratios[1] == pytest.approx(math.exp(0.5 * (0.171 - 0.1)), rel=1e-6)
    top = int(np.argmax(lam[:, 0] >= 1e3))
    np.testing.assert_allclose(ratios[2 : top - 1], math.exp(0.05), rtol=1e-6)
    assert 130 < top < 150
    assert np.all(lam[top:, 0] == np.float32(1e3))


def test_constant_negative_cosine_shrinks_to_min():
    lam = drive(GeometryAwareLR(), np.full((300, 1), -0.5))[:, 0]
    np.testing.assert_allclose(lam, spec_lambdas(as_fp32(np.full(300, -0.5))), rtol=1e-4)
    ratios = lam[1:] / lam[:-1]
    bottom = int(np.argmax(lam <= np.float32(1e-3)))
    np.testing.assert_allclose(ratios[: bottom - 1], math.exp(-0.05), rtol=1e-6)
    assert np.all(lam[bottom:] == np.float32(1e-3))


def test_cosine_at_target_converges():
    lam = drive(GeometryAwareLR(), np.full((400, 1), 0.1))[:, 0]
    np.testing.assert_allclose(lam, spec_lambdas(as_fp32(np.full(400, 0.1))), rtol=1e-4)
    # c̃ rises from 0 to c*: the exponents −g·c*·β^{t+1} sum to −0.5·0.1·9.
    assert lam[-1] == pytest.approx(math.exp(-0.45), rel=1e-4)
    assert abs(lam[-1] / lam[-50] - 1) < 1e-4  # fp32 rounding only


def test_cosine_at_target_after_warmup_stays_at_one():
    lam = drive(GeometryAwareLR(warmup=200), np.full((300, 1), 0.1))[:, 0]
    np.testing.assert_allclose(lam, spec_lambdas(as_fp32(np.full(300, 0.1)), warmup=200), rtol=1e-5)
    assert np.all(lam[:200] == 1.0)
    assert lam[-1] == pytest.approx(1.0, abs=1e-4)


def test_warmup_holds_lambda_at_one():
    lam = drive(GeometryAwareLR(warmup=5), np.full((12, 1), 0.9))[:, 0]
    assert np.all(lam[:5] == 1.0)
    assert lam[5] == pytest.approx(math.exp(0.05), rel=1e-6)  # c̃ kept running during the warm-up
    np.testing.assert_allclose(lam, spec_lambdas(as_fp32(np.full(12, 0.9)), warmup=5), rtol=1e-6)


def test_per_layer_mode_follows_each_cosine():
    rng = np.random.default_rng(0)
    cos = np.concatenate([np.full((150, 3), [0.9, -0.5, 0.1]), rng.uniform(-1, 1, (150, 3))])
    norms = rng.uniform(0.1, 2.0, cos.shape)
    norms[rng.random(cos.shape) < 0.2] = 0.0  # skipped tensors keep their λ and c̃
    sched = make_schedule("geometry_cosine_per_layer")  # SPEC's original controller, by its new name
    lam = drive(sched, cos, norms)
    for k in range(3):
        np.testing.assert_allclose(lam[:, k], spec_lambdas(as_fp32(cos[:, k]), as_fp32(norms[:, k])), rtol=1e-4)
    assert len({round(float(v), 6) for v in lam[149]}) == 3


def test_per_layer_mode_custom_knobs():
    rng = np.random.default_rng(1)
    cos = rng.uniform([0.3, -1.0, -0.6, -0.6], [1.0, 0.2, 1.0, 1.0], (200, 4))
    knobs = {"target": 0.3, "gain": 2.0, "beta": 0.5, "max_change": 0.2, "min_mult": 0.25, "max_mult": 4.0}
    lam = drive(GeometryAwareLR(per_layer=True, **knobs), cos)
    ref_knobs = {"target": 0.3, "gain": 2.0, "beta": 0.5, "delta": 0.2, "lo": 0.25, "hi": 4.0}
    for k in range(4):
        np.testing.assert_allclose(lam[:, k], spec_lambdas(as_fp32(cos[:, k]), **ref_knobs), rtol=1e-4)
    assert lam.max() == np.float32(4.0) and lam.min() == np.float32(0.25)  # both clips were reached


def test_global_mode_uses_update_norm_weighted_mean():
    rng = np.random.default_rng(2)
    cos = rng.uniform(-0.5, 1.0, (200, 4))
    norms = rng.uniform(0.0, 3.0, cos.shape) * (rng.random(cos.shape) < 0.8)
    norms[50] = 0.0  # one fully skipped step
    lam = drive(GeometryAwareLR(), cos, norms)
    c32, u32 = as_fp32(cos), as_fp32(norms)
    mean = (c32 * u32).sum(1) / np.maximum(u32.sum(1), 1e-30)
    np.testing.assert_allclose(lam[:, 0], spec_lambdas(mean, u32.sum(1)), rtol=1e-4)
    assert np.all(lam == lam[:, :1])
    # The plain mean gives a different trajectory: the weighting matters.
    assert np.abs(spec_lambdas(c32.mean(1)) / lam[:, 0] - 1).max() > 0.05


@pytest.mark.parametrize("per_layer", [False, True])
def test_all_zero_update_norms_leave_state_unchanged(per_layer):
    sched = GeometryAwareLR(per_layer=per_layer)
    drive(sched, np.full((30, 3), 0.8))
    lam, ema = sched.lam.clone(), sched.ema.clone()
    assert not torch.all(lam == 1.0)
    sched.multiplier(3, "cpu")
    sched.update(torch.tensor([-1.0, -1.0, -1.0]), torch.zeros(3))
    assert torch.equal(sched.lam, lam) and torch.equal(sched.ema, ema)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    cos, norms = rng.uniform(-0.5, 1.0, (60, 3)), rng.uniform(0.0, 1.0, (60, 3))
    a = GeometryAwareLR(per_layer=True, target=0.2, warmup=3)
    drive(a, cos[:30], norms[:30])
    state = a.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    b = GeometryAwareLR()  # different settings: the state carries them
    b.load_state_dict(loaded)
    assert (b.per_layer, b.target, b.warmup, b.steps_done) == (True, 0.2, 3, 30)
    rest_a, rest_b = drive(a, cos[30:], norms[30:]), drive(b, cos[30:], norms[30:])
    assert np.array_equal(rest_a, rest_b)
    # state_dict is a snapshot: a kept running afterwards, the saved λ did not.
    assert not torch.equal(state["lam"], a.lam)


@pytest.mark.parametrize(
    "kwargs",
    [{"beta": 1.0}, {"beta": -0.1}, {"min_mult": 2.0}, {"max_mult": 0.5}, {"min_mult": 0.0}, {"max_change": -0.1}],
)
def test_geometry_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        GeometryAwareLR(**kwargs)
    with pytest.raises(ValueError):
        make_schedule("geometry", warmup=-1)


# ----------------------------------------------------------------------------- other schedules


def test_warmup_cosine_values():
    sched = WarmupCosineSchedule(total_steps=20, warmup=4, min_mult=0.1)
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 12: 0.55, 20: 0.1, 25: 0.1}
    for t, v in expected.items():
        assert sched.value_at(t) == pytest.approx(v, abs=1e-12), t
    lam = drive(sched, np.zeros((26, 2)))
    np.testing.assert_allclose(lam[:, 0], [sched.value_at(t) for t in range(26)], rtol=1e-6)
    np.testing.assert_allclose(lam[[0, 3, 4, 12, 20, 25], 1], [0.25, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    assert np.all(np.diff(lam[4:21, 0]) < 0)  # decreasing between warm-up and end


def test_warmup_only_and_constant_schedules():
    rng = np.random.default_rng(4)
    cos = rng.uniform(-1, 1, (10, 3))
    lam = drive(make_schedule("warmup", warmup=4), cos)
    np.testing.assert_allclose(lam[:, 0], [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1], rtol=1e-6)
    assert np.all(drive(ConstantSchedule(), cos) == 1.0)
    assert np.all(drive(make_schedule("warmup_cosine", total_steps=5), np.zeros((1, 3))) == 1.0)


def test_make_schedule_names_and_errors():
    assert isinstance(make_schedule("constant"), ConstantSchedule)
    # issue #14: "geometry" is now the random-walk test; SPEC's original is "geometry_cosine"
    geo = make_schedule("geometry_cosine", target=0.2, warmup=7)
    assert isinstance(geo, GeometryAwareLR) and not geo.per_layer and geo.name == "geometry_cosine"
    assert (geo.target, geo.warmup) == (0.2, 7)
    per = make_schedule("geometry_cosine_per_layer")
    assert isinstance(per, GeometryAwareLR) and per.per_layer and per.name == "geometry_cosine_per_layer"
    rw = make_schedule("geometry", beta=0.5, warmup=7)
    assert isinstance(rw, RandomWalkLR) and not rw.per_layer and rw.name == "geometry"
    assert (rw.beta, rw.warmup) == (0.5, 7)
    per = make_schedule("geometry_per_layer")
    assert isinstance(per, RandomWalkLR) and per.per_layer and per.name == "geometry_per_layer"
    wc = make_schedule("warmup_cosine", total_steps=100, warmup=10, min_mult=0.05)
    assert isinstance(wc, WarmupCosineSchedule) and (wc.total_steps, wc.warmup, wc.min_mult) == (100, 10, 0.05)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("warmup_cosine", warmup=10)
    with pytest.raises(ValueError):
        make_schedule("warmup_cosine", total_steps=10, warmup=10)
