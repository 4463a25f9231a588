"""Studies: every study's --quick run writes its JSON, PNGs and README with sensible values; the
classifiers and phase definitions are checked on synthetic trajectories; CLI errors are one line."""

import json
import math

import pytest
import torch

from nup.cli import main
from nup.studies import STUDIES
from nup.studies.catapult import UVModel, classify
from nup.studies.eos import edge_summary

MB = 1 << 20


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (the CLI's --threads 1), restored afterwards: tiny models run faster so."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, one_thread):
    """Run a study once in --quick mode; returns (results, output directory)."""
    cache = {}
    base = tmp_path_factory.mktemp("studies")

    def run(name):
        if name not in cache:
            out = base / name
            assert main(["study", name, "--quick", "--quiet", "--threads", "1", "--out", str(out)]) == 0
            cache[name] = (json.loads((out / "results.json").read_text(encoding="utf-8")), out)
        return cache[name]

    return run


@pytest.mark.parametrize("name", STUDIES)
def test_quick_run_writes_json_png_and_readme(quick, name):
    results, out = quick(name)
    assert results["study"] == name
    assert results["figures"], "no figure listed"
    for fig in results["figures"]:
        data = (out / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# Study:")
    for fig in results["figures"]:
        assert f"]({fig})" in readme  # linked relative to the study folder
    assert sum(p.stat().st_size for p in out.iterdir()) < MB
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files
    assert results["environment"]["wall_time_s"] > 0


def test_depth_transfer_quick_values(quick):
    results, out = quick("depth_transfer")
    runs = results["runs"]
    cfg = results["config"]
    assert len(runs) == len(cfg["parameterizations"]) * len(cfg["depths"]) * len(cfg["lrs"])
    for r in runs:
        assert r["diverged"] or (0 < r["train_loss"] < 20 and 0 <= r["train_acc"] <= 1)
        # the quick config caps νP widths at 16 (m = 2): depth 6 has n_5 = 50, depth 3 has n_2 = 8
        assert r["widths_capped"] == (r["parameterization"] == "nup" and r["depth"] == 6)
    assert results["capped_runs"] == len(cfg["lrs"])
    for entry in results["analysis"]["parameterizations"].values():
        for by_depth in entry["by_depth"].values():
            opt = by_depth["optimum"]
            assert min(cfg["lrs"]) <= opt["refined"] <= max(cfg["lrs"])
            assert opt["loss"] == min(v for v in by_depth["losses"] if v is not None)
        drift = entry["drift"]
        assert drift["ratio"] > 0 and math.isfinite(drift["slope_loglog"])
    assert "Capped widths" in (out / "README.md").read_text(encoding="utf-8")


def test_optimal_lr_refines_between_neighbours():
    from nup.studies.depth_transfer import optimal_lr

    lrs = [0.01, 0.1, 1.0]
    sym = optimal_lr(lrs, [2.0, 1.0, 2.0])
    assert sym["grid"] == 0.1 and sym["refined"] == pytest.approx(0.1) and not sym["at_edge"]
    skew = optimal_lr(lrs, [1.5, 1.0, 2.0])
    assert 0.01 < skew["refined"] < 0.1  # the vertex leans towards the lower neighbour
    assert optimal_lr(lrs, [3.0, 2.0, 1.0])["at_edge"]
    assert optimal_lr(lrs, [math.inf] * 3)["grid"] is None


def test_coord_check_quick_values(quick):
    results, _ = quick("coord_check")
    cfg = results["config"]
    assert set(results["lrs"]) == {str(lr) for lr in cfg["lrs"]}
    for per_param in results["lrs"].values():
        assert set(per_param) == set(cfg["parameterizations"])
        for entry in per_param.values():
            for depth in cfg["depths"]:
                h, dh = entry["rms"]["h_rms"][str(depth)], entry["rms"]["dh_rms"][str(depth)]
                assert len(h) == len(dh) == cfg["steps"] + 1 and all(len(row) == depth for row in h)
                assert all(v > 0 for row in h for v in row)
                assert dh[0] == [0.0] * depth and all(v > 0 for v in dh[-1])
            slopes = entry["slopes"][str(cfg["steps"])]
            assert all(math.isfinite(slopes[k]) for k in ("h_mean", "dh_last", "dh_mean", "df"))


def test_uv_ntk_is_the_closed_form():
    from nup.diagnostics import ntk_top_eigenvalue

    torch.manual_seed(3)
    model = UVModel(1, 50).double()
    lam = ntk_top_eigenvalue(model, torch.ones(1, 1, dtype=torch.float64), method="full")
    want = float(model.u.detach().pow(2).sum() + model.v.detach().pow(2).sum()) / 50
    assert lam == pytest.approx(want, rel=1e-10)


def test_catapult_quick_classifies_uv_runs(quick):
    results, _ = quick("catapult")
    uv = {r["units"]: r for r in results["models"]["uv"]["runs"]}
    assert uv[0.5]["class"] == "lazy"
    assert abs(uv[0.5]["lam_final_over_lam0"] - 1) < 0.1
    assert uv[1.75]["class"] == "catapult"  # theory: catapult for 1 < η·λ₀/2 < 2
    assert uv[1.75]["eta_lam_final_over_2"] < 1  # the catapult ends below the edge λ = 2/η
    assert uv[3.0]["class"] == "divergent"
    b = results["models"]["uv"]["boundaries"]
    assert b["catapult_from"] == [0.5, 1.75] and b["divergent_from"] == [1.75, 3.0]
    mlp = results["models"]["mlp"]
    assert mlp["lam0"] > 0 and mlp["runs"][0]["loss_final"] < 1e-2 * mlp["runs"][0]["loss0"]
    assert mlp["runs"][-1]["class"] == "divergent"  # 8·(2/λ₀) is far beyond any MLP's edge


def test_catapult_classifier_on_synthetic_trajectories():
    decay = [0.5 * 0.5**t for t in range(30)]
    assert classify(decay, 1.0, 1.0) == "lazy"
    spike = [0.5, 2.0, 8.0, 3.0] + [0.1 * 0.5**t for t in range(30)]
    assert classify(spike, 1.0, 0.4) == "catapult"
    assert classify(spike, 1.0, 1.0) == "other"  # a rise without a drop of λ
    assert classify(decay, 1.0, 0.7) == "other"  # λ fell by 30% without a rise of the loss
    assert classify([0.5, 0.4, 0.45, 0.4], 1.0, 1.0) == "other"  # not converged
    assert classify([0.5, 5.0, math.inf], 1.0, None) == "divergent"
    assert classify([0.5, 1e7], 1.0, None) == "divergent"


def test_eos_quick_values(quick):
    results, _ = quick("eos")
    s0 = results["sharpness0"]
    for r in results["runs"]:
        assert r["eta"] == pytest.approx(r["fraction"] * 2 / s0)
        assert r["sharpness"][0] == pytest.approx(s0, rel=1e-3)
        assert all(s > 0 for s in r["sharpness"])
        assert r["final_loss"] < r["loss"][0]


def test_edge_summary():
    reached = edge_summary([0, 10, 20, 30], [0.5, 0.96, 1.02, 0.98], eta=2.0)
    assert reached["reached_at"] == 10 and reached["state"] == "eos"
    assert reached["ratio_mean_after"] == pytest.approx((0.96 + 1.02 + 0.98) / 3)
    approaching = edge_summary([0, 10, 20], [0.5, 0.8, 0.97], eta=2.0)  # near 2/η but never across it
    assert approaching["reached_at"] == 20 and approaching["state"] == "sharpening"
    below = edge_summary([0, 10], [0.4, 0.41], eta=2.0)
    assert below["reached_at"] is None and below["state"] == "flat" and below["ratio_max"] == pytest.approx(0.41)


def test_index_links_every_study(quick):
    from nup.studies import write_index

    outs = [quick(name)[1] for name in STUDIES]
    text = write_index(outs[0].parent).read_text(encoding="utf-8")
    for name in STUDIES:
        assert f"[{name}]({name}/README.md): " in text


def test_unknown_study_is_a_one_line_error(capsys):
    assert main(["study", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown study 'nonsense'" in err and "depth_transfer" in err


def test_options_that_do_not_apply_are_refused(capsys, tmp_path):
    assert main(["study", "coord_check", "--uv-width", "8", "--out", str(tmp_path)]) == 2
    assert "--uv-width does not apply to study coord_check" in capsys.readouterr().err
    assert main(["study", "all", "--steps", "3", "--out", str(tmp_path)]) == 2
    assert "do not apply to all" in capsys.readouterr().err
    assert main(["study", "eos", "--device", "tpu9", "--out", str(tmp_path)]) == 2
    assert "unknown device 'tpu9'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_options_reach_the_config():
    from nup.cli import build_parser
    from nup.studies import make_config

    def config(*argv):
        return make_config(argv[1], build_parser("study").parse_args(list(argv)))

    cfg = config("study", "depth_transfer", "--max-width", "0", "--depths", "4,8", "--lrs", "0.1,0.2,0.4")
    assert cfg.max_width is None and cfg.depths == (4, 8) and cfg.lrs == (0.1, 0.2, 0.4)
    assert config("study", "depth_transfer").max_width == 128
    assert config("study", "coord_check", "--quick", "--max-width", "64").max_width == 64
    cfg = config("study", "schedule", "--seeds", "5", "--seed", "3")  # issue #14: seeds replace --matched-control
    assert cfg.seeds == 5 and cfg.seed == 3
    assert config("study", "catapult", "--uv-units", "0.5,2,4").uv_units == (0.5, 2.0, 4.0)


def test_help_lists_the_studies_and_their_options(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    for name in (*STUDIES, "--quick", "--uv-units", "--eta-fractions", "--max-width"):
        assert name in text
