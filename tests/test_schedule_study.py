"""The schedule study (issue #14): its catapult definition on synthetic trajectories, its curvature
measures against plain-GD identities, and one --quick run's records and controls."""

import json

import pytest
import torch

from nup.cli import main
from nup.studies.schedule import DROP, catapults, effective_sharpness, mean_ci, ntk_eigenvalues


def test_catapult_needs_a_spike_a_drop_of_lambda0_and_the_edge():
    loss = [1.0, 0.9, 0.8, 1.5, 2.0, 0.9, 0.7, 0.6, 0.9, 0.5, 0.4, 0.8, 0.7, 0.3]
    m_step = [0, 2, 4, 6, 8, 10, 12]
    lam0 = [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    eta_lam0 = [1.0, 3.0, 1.5, 1.5, 1.5, 1.5, 1.5]
    out = catapults(loss, m_step, lam0, eta_lam0)
    # episodes: [3, 6) (0.7 is back at the running minimum 0.8), [8, 9) (one step), [11, 13)
    assert out["episodes"] == [[3, 6], [8, 9], [11, 13]]
    # [3, 6): beyond the edge at step 2 and λ₀ halves: a catapult; [8, 9): one step, a flip-flop;
    # [11, 13): no drop of λ₀ across it
    assert out["catapults"] == [[3, 6]] and out["steps"] == 3


def test_catapult_without_the_edge_or_without_the_drop_does_not_count():
    loss = [1.0, 2.0, 3.0, 0.5]
    assert catapults(loss, [0, 4], [1.0, 0.5], [1.9, 1.9])["steps"] == 0  # below the edge
    assert catapults(loss, [0, 4], [1.0, 1.0 - DROP / 2], [3.0, 3.0])["steps"] == 0  # λ₀ barely moved
    assert catapults(loss, [0, 4], [1.0, 0.5], [3.0, 3.0])["catapults"] == [[1, 3]]
    assert catapults([1.0, 2.0, 3.0], [0, 2], [1.0, 0.5], [3.0, 3.0])["catapults"] == [[1, 3]]  # runs to the end


def test_curvatures_of_equal_rates_are_rate_times_the_plain_ones():
    """With equal per-tensor rates α: D^½HD^½ = α·H and JDJᵀ = α·JJᵀ."""
    from nup import NuMLP
    from nup.diagnostics import ntk_top_eigenvalue, sharpness
    from nup.studies._common import half_mse, plain_forward

    torch.manual_seed(0)
    model = NuMLP(6, 3, 3, 4, activation="tanh").double()
    x, target = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    s = sharpness(model, lambda m, b: half_mse(plain_forward(m, b[0]), b[1]), (x, target))
    assert s > 0 and effective_sharpness(model, (x, target), [0.3] * 3) == pytest.approx(0.3 * s, rel=1e-6)
    lam0, eta_lam0 = ntk_eigenvalues(model, x, [0.3] * 3)
    assert lam0 == pytest.approx(ntk_top_eigenvalue(model, x, method="full"), rel=1e-6)
    assert eta_lam0 == pytest.approx(0.3 * lam0, rel=1e-6)
    # for MSE at a zero residual the Hessian is the Gauss–Newton JᵀJ/n: S = λ₀
    with torch.no_grad():
        target = plain_forward(model, x)
    s0 = sharpness(model, lambda m, b: half_mse(plain_forward(m, b[0]), b[1]), (x, target))
    assert s0 == pytest.approx(lam0, rel=1e-4)


def test_mean_ci_is_student_t():
    out = mean_ci([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["ci95"] == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)
    assert mean_ci([None, 5.0]) == {"mean": 5.0, "ci95": None, "n": 1}


def test_schedule_quick_run(tmp_path):
    out = tmp_path / "schedule"
    assert main(["study", "schedule", "--quick", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cfg, runs = results["config"], results["runs"]
    arms = {"geometry", "geometry_cosine", "geometry_sharpness", "replay", "warmup_cosine", "constant_x0.5",
            "constant_x4"}
    assert set(runs) == arms and all(len(rs) == cfg["seeds"] == 2 for rs in runs.values())
    geos = runs["geometry"]
    for i, (geo, replay, warm) in enumerate(zip(geos, runs["replay"], runs["warmup_cosine"])):
        assert replay["seed"] == geo["seed"]
        assert replay["lr_mult"] == pytest.approx(geos[1 - i]["lr_mult"], rel=1e-5)  # the other seed's λ_t
        assert max(warm["lr_mult"]) == pytest.approx(max(geo["lr_mult"]), rel=1e-4)  # to the same peak
        assert warm["lr_mult"][-1] < 0.05 * max(warm["lr_mult"])  # then decays to 0
    assert runs["geometry"][0]["seed"] == 0 and runs["geometry"][1]["seed"] == 1
    assert runs["geometry"][0]["loss"][0] != runs["geometry"][1]["loss"][0]
    assert runs["constant_x4"][0]["lr"] == pytest.approx(4 * cfg["lr"])
    for rs in runs.values():
        for r in rs:
            assert len(r["loss"]) == cfg["steps"] + 1 and len(r["lr_mult"]) == cfg["steps"]
            assert all(v > 0 for v in r["lam0"]) and all(v >= 0 for v in r["eta_lam0"] + r["eta_sharpness"])
            assert all(v > 0 for v in r["eta_lam0"][:-1])  # only warmup_cosine's last rate is 0
    summary = results["summary"]
    assert summary["tuned_constant"] in ("constant_x0.5", "constant_x4")
    assert set(summary["paired_catapult_steps"]) == {"geometry - replay", "geometry - warmup_cosine",
                                                     f"geometry - {summary['tuned_constant']}"}
    assert (out / "schedules.png").stat().st_size > 10_000
    assert "catapult steps" in (out / "README.md").read_text(encoding="utf-8")
