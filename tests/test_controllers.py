"""Controllers with a fixed point under noise (SPEC §4, issue #14), on synthetic update sequences.

Each sequence is simulated with real vectors in ``d`` dimensions: the step ``ΔP_t = λ_t·D_t/‖D_t‖``
and the cumulative ``C``, so ``cos``, ``u`` and ``‖C‖`` are exactly what NuP would report:

- noise: ``D_t`` isotropic and independent (a random walk): λ must stay, on average;
- drift: ``D_t = a·e + √(1−a²)·ξ_t`` with a fixed ``e``: λ must rise;
- period2: ``D_t = (−1)^t·v + 0.3·ξ_t``: an edge-of-stability oscillation: λ must fall.
"""

import io

import numpy as np
import pytest
import torch

from nup import NuMLP, NuP, RandomWalkLR, ReplaySchedule, SharpnessTargetLR, make_schedule
from nup.schedule import GeometryAwareLR, WarmupCosineSchedule


def simulate(sched, kind, steps: int = 300, d: int = 1000, seed: int = 0, n: int = 1, c_norm: bool = True):
    """log λ_t, shape (steps, n), of ``sched`` driven by ``n`` independent tensors of sequence ``kind``.

    ``kind``: one name for every tensor, or a tuple of ``n`` names (one per tensor).
    """
    kinds = (kind,) * n if isinstance(kind, str) else kind
    g = torch.Generator().manual_seed(seed)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)
    c = torch.zeros(n, d, dtype=torch.float64)
    v, e = (unit(torch.randn(n, d, generator=g, dtype=torch.float64)) for _ in range(2))
    out = []
    for t in range(steps):
        lam = sched.multiplier(n, "cpu").double()
        out.append(lam.log().numpy().copy())
        xi = unit(torch.randn(n, d, generator=g, dtype=torch.float64))
        options = {"noise": xi, "drift": 0.3 * e + 0.954 * xi, "period2": (-1) ** t * v + 0.3 * xi}
        direction = torch.stack([options[k][i] for i, k in enumerate(kinds)])
        step = lam[:, None] * unit(direction)
        u, cn = step.norm(dim=1), c.norm(dim=1)
        cos = torch.where(cn > 0, (step * c).sum(1) / (u * cn).clamp_min(1e-300), 0.0)
        c += step
        sched.update(cos.float(), u.float(), c_norm=c.norm(dim=1).float() if c_norm else None)
    return np.array(out)


RANDOM_WALK = [lambda: RandomWalkLR(), lambda: RandomWalkLR(per_layer=True)]


@pytest.mark.parametrize("make", RANDOM_WALK, ids=["global", "per_layer"])
def test_random_walk_lr_pure_noise_keeps_lambda_on_average(make):
    finals = np.concatenate([simulate(make(), "noise", seed=s, n=2)[-1] for s in range(12)])
    # no trend: the mean final log λ over 24 runs is within 3 standard errors of 0 ...
    assert abs(finals.mean()) < 3 * finals.std() / np.sqrt(len(finals)) + 0.05
    # ... and no run went anywhere near a clip (λ ∈ [0.01, 100], log: ±4.6)
    assert np.abs(finals).max() < 1.0


@pytest.mark.parametrize("make", RANDOM_WALK, ids=["global", "per_layer"])
def test_random_walk_lr_drift_raises_and_period_two_lowers_lambda(make):
    up, down = simulate(make(), "drift"), simulate(make(), "period2")
    assert up[-1].min() > np.log(50) and np.all(np.diff(up[20:, 0]) >= -1e-6)
    assert down[-1].max() < np.log(0.02) and np.all(np.diff(down[20:150, 0]) < 0)  # then it sits at the floor


def test_random_walk_lr_per_layer_separates_regimes_and_global_pools_them():
    kinds = ("noise", "drift", "period2")
    per = simulate(RandomWalkLR(per_layer=True), kinds, seed=1, n=3)[-1]
    assert abs(per[0]) < 1 and per[1] > 3 and per[2] < -3
    pooled = simulate(RandomWalkLR(), kinds, seed=1, n=3)
    assert np.all(pooled == pooled[:, :1])  # global mode: one λ, from the sums over tensors


def test_random_walk_lr_keeps_c_norm_by_the_identity_when_not_given():
    with_c, without = simulate(RandomWalkLR(), "noise", seed=2), simulate(RandomWalkLR(), "noise", seed=2, c_norm=False)
    np.testing.assert_allclose(with_c, without, atol=1e-4)


def test_the_original_cosine_controller_has_no_fixed_point_under_noise():
    """SPEC §4's flaw, kept as the named variant geometry_cosine: pure noise drives λ to its floor."""
    assert make_schedule("geometry_cosine").name == "geometry_cosine"
    noise = simulate(GeometryAwareLR(), "noise")
    assert noise[-1, 0] == pytest.approx(np.log(1e-3), abs=1e-4)
    assert simulate(GeometryAwareLR(), "drift")[-1, 0] > np.log(100)
    assert simulate(GeometryAwareLR(), "period2")[-1, 0] == pytest.approx(np.log(1e-3), abs=1e-4)


def _sharpness_run(kind: str, steps: int = 60, seed: int = 0) -> np.ndarray:
    """SharpnessTargetLR fed ``S_eff = λ·h_t·(1 + noise)`` after each step: the effective sharpness scales like λ.

    noise: constant ``h = 1`` with 20% measurement noise; drift: ``h`` falling 5% a step (a catapult
    flattening the landscape); period2: ``h`` rising 5% a step (sharpening past the edge).
    """
    rng = np.random.default_rng(seed)
    sched = SharpnessTargetLR(target=2.0)
    out = []
    h = 1.0
    for _ in range(steps):
        lam = float(sched.multiplier(3, "cpu")[0])
        out.append(np.log(lam))
        sched.update(torch.zeros(3), torch.ones(3))
        h *= {"noise": 1.0, "drift": 0.95, "period2": 1.05}[kind]
        sched.observe(torch.tensor(lam * h * (1 + 0.2 * rng.standard_normal() if kind == "noise" else 1.0)))
    return np.array(out)


def test_sharpness_target_has_a_fixed_point_and_follows_the_curvature():
    noise = np.array([_sharpness_run("noise", seed=s)[-1] for s in range(12)])
    assert abs(noise.mean() - np.log(2.0)) < 0.1  # λ·h = 2 with h = 1
    drift, sharpening = _sharpness_run("drift"), _sharpness_run("period2")
    assert drift[-1] > drift[10] + 2 and sharpening[-1] < sharpening[10] - 2
    with pytest.raises(RuntimeError, match="observe"):
        SharpnessTargetLR().observe(1.0)
    with pytest.raises(ValueError):
        SharpnessTargetLR(rate=0.0)


@pytest.mark.parametrize("name", ["geometry", "geometry_per_layer", "geometry_sharpness", "warmup_cosine"])
def test_state_dict_round_trip_continues_identically(name):
    a = make_schedule(name, total_steps=100, warmup=3) if name == "warmup_cosine" else make_schedule(name)
    simulate(a, "drift", steps=30, n=3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_schedule(name, total_steps=7) if name == "warmup_cosine" else make_schedule(name)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for s in (a, b):
        if isinstance(s, SharpnessTargetLR):
            s.observe(torch.tensor(3.0))
    rest_a, rest_b = (simulate(s, "noise", steps=20, n=3, seed=5) for s in (a, b))
    np.testing.assert_array_equal(rest_a, rest_b)


@pytest.mark.parametrize("name", ["warmup_cosine", "geometry", "geometry_cosine"])
def test_a_step_where_nothing_moved_does_not_advance_the_clock(name):
    """Issue #13's deviation: warmup_cosine counted skipped steps. Now no schedule's clock moves then."""
    rng = np.random.default_rng(0)
    cos, norms = rng.uniform(-0.3, 0.8, (40, 2)).astype(np.float32), np.ones((40, 2), np.float32)
    skip = [5, 6, 20]

    def run(rows):
        s = make_schedule(name, total_steps=30, warmup=4)
        lams = []
        for c, u in rows:
            lams.append(s.multiplier(2, "cpu").clone())
            s.update(torch.from_numpy(c), torch.from_numpy(u), ok=torch.from_numpy(u > 0))
        return torch.stack(lams), s

    plain, s_plain = run([(cos[t], norms[t]) for t in range(40)])
    rows = []
    for t in range(40):
        if t in skip:
            rows.append((-np.ones(2, np.float32), np.zeros(2, np.float32)))
        rows.append((cos[t], norms[t]))
    with_skips, s_skips = run(rows)
    keep = [i for i in range(len(rows)) if rows[i][1].any()]
    assert torch.equal(with_skips[keep], plain)  # the moved steps see exactly the plain sequence
    assert float(s_skips.clock) == float(s_plain.clock) == 40 and s_skips.steps_done == 43


def test_nup_does_not_advance_warmup_cosine_when_every_gradient_is_zero():
    torch.manual_seed(0)
    model = NuMLP(5, 3, 3, 2)
    opt = NuP(model.parameters(), lr=0.1, schedule=WarmupCosineSchedule(total_steps=10, warmup=4))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    seen = []
    for t in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if t in (1, 2):
            for p in model.parameters():
                p.grad.zero_()
        opt.step()
        seen.append(round(float(opt.schedule.multiplier(len(list(model.parameters())), "cpu")[0]), 6))
    assert seen == [0.5, 0.5, 0.5, 0.75, 1.0, 1.0]
    assert float(opt.schedule.clock) == 4 and opt.stat_vectors()["step"] == 6


def test_a_checkpoint_from_before_the_clock_resumes_at_its_step_count():
    old_state = {"lam": torch.full((2,), 0.5), "steps_done": 2, "total_steps": 10, "warmup": 4, "min_mult": 0.0}
    s = WarmupCosineSchedule(total_steps=10, warmup=4)
    s.load_state_dict(old_state)
    s.update(torch.zeros(2), torch.ones(2))
    assert float(s.multiplier(2, "cpu")[0]) == pytest.approx(1.0)  # step 3 (λ = 4/4), not step 1 (2/4)


def test_replay_schedule_plays_the_recorded_values_then_holds_the_last():
    s = ReplaySchedule([0.5, 2.0, 3.0])
    seen = []
    for _ in range(5):
        seen.append(float(s.multiplier(2, "cpu")[1]))
        s.update(torch.zeros(2), torch.ones(2))
    assert seen == [0.5, 2.0, 3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="positive"):
        ReplaySchedule([1.0, -1.0])
