"""Studies: every study's --quick run writes its JSON, PNGs and README with sensible values; the
classifiers and phase definitions are checked on synthetic trajectories; CLI errors are one line."""

import json
import math

import numpy as np
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
    cfg = results["config"]
    assert results["horizons"] == [cfg["horizon"], 2 * cfg["horizon"], 4 * cfg["horizon"]]
    runs = results["runs"]
    by_key = {}
    for r in runs:
        assert set(r["metric"]) == {str(h) for h in results["horizons"]}
        assert all(v is None or 0 < v < 1e4 for v in r["metric"].values())
        assert not r["widths_capped"]
        by_key.setdefault((r["task"], r["parameterization"], r["depth"]), set()).add((r["j"], r["seed"]))
    for (task, variant, depth), done in by_key.items():
        js = sorted({j for j, _ in done})
        assert js == list(range(js[0], js[-1] + 1))  # a contiguous √2 grid
        assert cfg["lr_points"] <= len(js) <= cfg["max_lr_points"]
        assert len(done) == len(js) * cfg["seeds"]  # every lr has every seed
        entry = results["analysis"][task]["parameterizations"][variant]
        for h in results["horizons"]:
            e = entry["horizons"][str(h)]["by_depth"][str(depth)]
            assert e["lrs"] == pytest.approx([cfg["lr_centre"] * math.sqrt(2) ** j for j in js])
            assert e["trained"] == (e["optimum"]["loss"] <= results["analysis"][task]["chance_loss"] / 2)
            half = results["analysis"][task]["chance_loss"] / 2
            metric = {(r["j"], r["seed"]): r["metric"][str(h)] for r in runs
                      if (r["task"], r["parameterization"], r["depth"]) == (task, variant, depth)}
            assert e["stuck"] == [sum(v is None or v > half for (jj, _), v in metric.items() if jj == j) for j in js]
        # the readout inputs' mean cosine: at init and after T steps in every run, split by trained / stuck
        mine = [r for r in runs if (r["task"], r["parameterization"], r["depth"]) == (task, variant, depth)]
        finals = [r["metric"][str(results["horizons"][-1])] for r in mine]
        assert all(set(r["feature_cos"]) == set(r["inactive"]) == {"0", str(cfg["horizon"])} for r in mine)
        assert all(0 <= v <= 1 for r in mine for v in r["inactive"].values())
        f = entry["features"][str(depth)]
        assert f["trained"]["runs"] + f["stuck"]["runs"] == len(done) == len(mine)
        assert f["stuck"]["runs"] == sum(v is None or v > half for v in finals)
        assert f["init"] == pytest.approx(sum(r["feature_cos"]["0"] for r in mine) / len(mine))
        assert f["inactive_init"] == pytest.approx(sum(r["inactive"]["0"] for r in mine) / len(mine))
        assert 0 < results["analysis"][task]["feature_cos_predicted"][str(depth)] < 1
    assert _checked_drifts(results) > 0  # the quick study fits two parameterizations at some horizon
    from nup.studies.depth_transfer import summary_line

    drift = results["analysis"]["teacher"]["shared_drift"][str(results["horizons"][-1])]
    assert ("teacher shared drift" in summary_line(results)) == (drift is not None)
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "T(L) prediction" in readme and "95% CI" in readme and "runs left above half of chance" in readme
    assert "T_e(L) prediction" in readme and "what T_e(L) misses" in readme
    assert "how alike the inputs look to the readout" in readme and "switched off for every probe input" in readme


def _checked_drifts(results: dict) -> int:
    """Check every shared drift, against T(L) and against T_e(L), is the mean miss of the fitted slopes;
    returns how many there were."""
    drifts = 0
    for entry in results["analysis"].values():
        for key, predicted in (("shared_drift", "predicted_slope"), ("shared_drift_effective",
                                                                      "predicted_slope_effective")):
            for h in results["horizons"]:
                d = entry[key][str(h)]
                fits = {v: e["horizons"][str(h)]["fit"] for v, e in entry["parameterizations"].items()}
                fitted = [v for v, f in fits.items() if f["slope"] is not None]
                if len(fitted) < 2:
                    assert d is None
                    continue
                miss = {v: fits[v]["slope"] - fits[v][predicted] for v in fitted}
                assert d["parameterizations"] == fitted
                assert d["drift"] == pytest.approx(sum(miss.values()) / len(miss))
                assert all(d["beyond"][v]["value"] == pytest.approx(miss[v] - d["drift"]) for v in fitted)
                drifts += 1
    return drifts


def test_depth_transfer_adds_the_effective_normalizer_to_finished_runs(quick, tmp_path):
    """Adding nup_effective to a finished study reuses its runs; nup_effective's T_e(L) is e_1 + 1 at every
    depth (its divisor is the hidden block's T_e), and every T_e is below T (batch steps move less)."""
    import shutil

    from nup.studies.depth_transfer.runs import probe_cosines
    from nup.theory import batch_efficiency_at_init

    results, out = quick("depth_transfer")
    more = tmp_path / "more"
    shutil.copytree(out, more)
    names = [*results["config"]["parameterizations"], "nup_effective"]
    assert main(["study", "depth_transfer", "--quick", "--quiet", "--threads", "1", "--parameterizations",
                 ",".join(names), "--out", str(more)]) == 0
    added = json.loads((more / "results.json").read_text(encoding="utf-8"))
    assert [r for r in added["runs"] if r["parameterization"] != "nup_effective"] == results["runs"]
    assert added["runs_environment"]["runs_reused"] == len(results["runs"])
    assert f"{len(results['runs'])} reused from the folder's saved runs" in (more / "README.md").read_text("utf-8")
    assert {r["parameterization"] for r in added["runs"]} == set(names)
    from nup.studies.depth_transfer import QUICK, Config

    cfg = Config(**QUICK)
    entry = added["analysis"]["teacher"]["parameterizations"]
    e1 = batch_efficiency_at_init(probe_cosines(cfg, "teacher"), 3, cfg.batch_size)[0]
    assert all(t == pytest.approx(e1 + 1) for t in entry["nup_effective"]["T_effective"].values())
    assert entry["nup_effective"]["T"] != entry["nup_harmonic"]["T"]
    assert all(v["T_effective"][d] < v["T"][d] for v in entry.values() for d in v["T"])
    assert _checked_drifts(added) > 0


def test_depth_transfer_resumes_from_its_saved_runs(quick, tmp_path):
    import shutil

    results, out = quick("depth_transfer")
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert main(["study", "depth_transfer", "--quick", "--quiet", "--out", str(again)]) == 0
    resumed = json.loads((again / "results.json").read_text(encoding="utf-8"))
    assert resumed["runs"] == results["runs"]  # every run reused (their timings too), none redone
    assert resumed["analysis"] == results["analysis"]
    assert main(["study", "depth_transfer", "--quick", "--quiet", "--reanalyse", "yes", "--out", str(again)]) == 0
    assert json.loads((again / "results.json").read_text(encoding="utf-8"))["analysis"] == results["analysis"]
    assert main(["study", "depth_transfer", "--quick", "--quiet", "--reanalyse", "yes", "--out",
                 str(tmp_path / "empty")]) == 2  # nothing saved there: one clear error
    fresh = tmp_path / "other"
    shutil.copytree(out, fresh)
    assert main(["study", "depth_transfer", "--quick", "--quiet", "--horizon", "4", "--out", str(fresh)]) == 0
    assert json.loads((fresh / "results.json").read_text(encoding="utf-8"))["config"]["horizon"] == 4


def test_depth_transfer_schedule_is_a_run_setting(quick, tmp_path, one_thread):
    import shutil

    from nup.studies.depth_transfer import Config, cached_runs, run, train_one

    results, out = quick("depth_transfer")
    cfg = Config(**results["config"])
    assert cfg.schedule == "cosine"  # the default: the lr decays to 0 at 4T
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert len(cached_runs(cfg, again)) == len(results["runs"])
    constant = Config(**{**results["config"], "schedule": "constant"})
    assert cached_runs(constant, again) == {}  # runs of another schedule are not reused
    saved = json.loads((again / "results.json").read_text(encoding="utf-8"))
    del saved["config"]["schedule"]  # a results.json from before the setting existed: constant-lr runs
    (again / "results.json").write_text(json.dumps(saved), encoding="utf-8")
    assert cached_runs(cfg, again) == {} and len(cached_runs(constant, again)) == len(results["runs"])
    job = ("teacher", "nup_harmonic", 3, 0, cfg.seed)
    decayed, flat = train_one(cfg, *job)["metric"], train_one(constant, *job)["metric"]
    assert decayed == next(r for r in results["runs"] if (r["parameterization"], r["depth"], r["j"],
                                                          r["seed"]) == job[1:])["metric"]
    assert decayed != flat
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose from cosine, constant"):
        run(Config(**{**results["config"], "schedule": "linear"}), tmp_path / "bad", progress=False)


def test_depth_transfer_extends_an_untrained_edge_optimum_at_the_longest_horizon():
    """A depth stuck above half of chance with its best lr at the grid's low edge gets a lower lr (it may
    train there); below the longest horizon an untrained curve does not extend the grid."""
    from nup.studies.depth_transfer import Config, grid_extension, horizons

    cfg = Config(seeds=1, lr_points=3, max_lr_points=6, horizon=10)
    chance = 1.0
    short, long = horizons(cfg)[0], horizons(cfg)[-1]

    def runs_with(losses_at):  # {horizon: [loss per j]}, the other horizons flat and trained
        runs = {}
        for j in range(3):
            metric = {str(h): losses_at.get(h, [0.3, 0.2, 0.3])[j] for h in horizons(cfg)}
            runs[("teacher", "nup", 32, j, cfg.seed)] = {"metric": metric}
        return runs

    assert grid_extension(cfg, runs_with({long: [0.8, 0.9, 0.95]}), ("teacher", "nup", 32), [0, 1, 2], chance) == [-1]
    assert grid_extension(cfg, runs_with({short: [0.8, 0.9, 0.95]}), ("teacher", "nup", 32), [0, 1, 2], chance) == []
    assert grid_extension(cfg, runs_with({short: [0.3, 0.2, 0.1]}), ("teacher", "nup", 32), [0, 1, 2], chance) == [3]


def test_optimal_lr_is_the_log_log_parabola_vertex():
    from nup.studies.lr_optimum import optimal_lr

    lrs = [0.01 * math.sqrt(2) ** j for j in range(7)]
    true = 0.01 * math.sqrt(2) ** 3.3
    losses = [math.exp(0.5 * (math.log(lr / true)) ** 2) * 0.2 for lr in lrs]
    opt = optimal_lr(lrs, losses)
    assert opt["grid"] == pytest.approx(lrs[3]) and not opt["at_edge"]
    assert opt["refined"] == pytest.approx(true, rel=1e-6)  # exact for a parabola in (log lr, log loss)
    assert optimal_lr(lrs, sorted(losses))["at_edge"]
    diverged = losses[:5] + [math.inf, math.inf]
    assert optimal_lr(lrs, diverged)["refined"] == pytest.approx(true, rel=1e-6)
    assert optimal_lr(lrs, [math.inf] * 7)["grid"] is None


def _planted_curves(rng: np.random.Generator, depths: list[int], slope: float, n_seeds: int = 4):
    """Per-depth lr grids and ``(n_seeds, n_lrs)`` losses whose η* falls like ``L**slope`` (2% seed noise)."""
    lrs, per_seed = {}, {}
    for d in depths:
        eta = 0.5 * d**slope
        lrs[d] = [eta * math.sqrt(2) ** j for j in range(-3, 4)]
        clean = np.array([0.5 * math.log(lr / eta) ** 2 for lr in lrs[d]])
        per_seed[d] = 0.3 * np.exp(clean + 0.02 * rng.standard_normal((n_seeds, len(lrs[d]))))
    return lrs, per_seed


def test_slope_ci_covers_a_planted_slope_and_excludes_zero():
    from nup.studies.lr_optimum import slope_with_ci

    depths = [4, 8, 16, 32]
    lrs, per_seed = _planted_curves(np.random.default_rng(0), depths, -0.6)
    fit = slope_with_ci(depths, lrs, per_seed, n_boot=200)
    assert fit["slope"] == pytest.approx(-0.6, abs=0.05)
    lo, hi = fit["ci95"]
    assert lo <= fit["slope"] <= hi and hi < 0 and hi - lo < 0.2
    assert slope_with_ci([4], lrs, per_seed)["slope"] is None


def test_shared_drift_separates_a_common_miss_from_each_parameterization():
    """Three parameterizations whose slopes miss their predictions by a common −0.3 and by +0.2, 0, −0.2 of
    their own: the shared drift is −0.3, what is left is +0.2, 0, −0.2, and the paired intervals cover them."""
    from nup.studies.lr_optimum import shared_drift, slope_with_ci

    rng = np.random.default_rng(1)
    depths = [4, 8, 16, 32]
    predicted = {"a": -1.0, "b": -0.5, "c": 0.0}
    own = {"a": 0.2, "b": 0.0, "c": -0.2}
    slopes, boots = {}, {}
    for p in predicted:
        lrs, per_seed = _planted_curves(rng, depths, predicted[p] - 0.3 + own[p])
        fit = slope_with_ci(depths, lrs, per_seed, n_boot=200)
        slopes[p], boots[p] = fit["slope"], fit["replicates"]
    d = shared_drift(slopes, predicted, boots)
    assert d["drift"] == pytest.approx(-0.3, abs=0.03) and d["n_boot"] == 200
    assert d["ci95"][0] <= d["drift"] <= d["ci95"][1] and d["ci95"][1] < -0.2
    for p in predicted:
        left = d["beyond"][p]
        assert left["value"] == pytest.approx(own[p], abs=0.05)
        assert left["ci95"][0] <= left["value"] <= left["ci95"][1]
    assert d["beyond"]["a"]["ci95"][0] > 0 > d["beyond"]["c"]["ci95"][1]  # told apart from 0 at 2% noise


def test_bootstrap_replicates_pair_up_across_parameterizations():
    """With the same seed count, replicate b resamples the same seeds in every call: a curve set and its
    copy shifted by a constant in log lr give the same replicate slopes, one for one."""
    from nup.studies.lr_optimum import slope_with_ci

    depths = [4, 8, 16]
    lrs, per_seed = _planted_curves(np.random.default_rng(2), depths, -0.5)
    shifted = {d: [2 * lr for lr in lrs[d]] for d in depths}
    a = slope_with_ci(depths, lrs, per_seed, n_boot=100)["replicates"]
    b = slope_with_ci(depths, shifted, per_seed, n_boot=100)["replicates"]
    assert a.shape == (100,) and np.allclose(a, b) and np.isfinite(a).all() and a.std() > 0
    assert not np.allclose(a, slope_with_ci(depths, lrs, per_seed, n_boot=100, seed=1)["replicates"])
    assert slope_with_ci([4], lrs, per_seed)["replicates"].size == 0


def test_coord_check_quick_values(quick):
    results, _ = quick("coord_check")
    cfg = results["config"]
    assert set(results["lrs"]) == set(results["judged"]) == {str(lr) for lr in cfg["lrs"]}
    for lr, per_param in results["lrs"].items():
        assert set(per_param) == set(cfg["parameterizations"])
        for variant, entry in per_param.items():
            judged = results["judged"][lr][variant]
            for depth in cfg["depths"]:
                e = entry[str(depth)]
                assert len(e["rho"]) == depth - 1 and len(e["steps"]) == cfg["steps"]
                for step in e["steps"]:
                    assert len(step["own"]) == len(step["change"]) == depth - 1
                    assert all(v > 0 for v in step["own"] + step["change"])
                    assert step["df"] > 0 and step["df_readout"] > 0 and step["df_body"] > 0
                j = judged["by_depth"][str(depth)]
                # normalized steps on a batch of 16: every layer moves, by at most the rank-one η·ρ_k
                assert all(0.05 < eff <= 1.0 + 1e-4 for eff in j["efficiency"])
                predicted = j["efficiency_predicted"]
                assert len(predicted) == depth - 1 and all(0 < p <= 1 for p in predicted)
                assert j["efficiency_miss"] == pytest.approx(max(abs(a - b) for a, b in
                                                                 zip(j["efficiency"], j["efficiency_predicted"])))
            assert all(math.isfinite(judged[k]) for k in ("slope_last", "predicted_slope_last", "slope_mid"))
        harmonic = results["judged"][lr]["nup_harmonic"]
        assert abs(harmonic["predicted_slope_last"]) < 1e-9  # T(L) is 2 at every depth


def test_coord_check_own_move_is_exactly_lr_rho_at_batch_one():
    from nup import NuMLP
    from nup.studies.coord_check import measure

    torch.manual_seed(0)
    model = NuMLP(64, 10, 5, 64, width_offset=2)
    x, y = torch.randn(1, 64), torch.tensor([3])
    first = measure(model, 0.01, x, y, steps=1)[0]
    # rank one: own move = η·s·‖x‖/‖W x‖ ≈ η·ρ_k (Gaussian W, width ≥ 576)
    assert first["own"] == pytest.approx([0.01 * r for r in model.layout.rho], rel=0.1)


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


def test_index_gives_a_reanalysed_study_the_time_of_its_runs(quick, tmp_path):
    import shutil

    from nup.studies import write_index

    results, out = quick("depth_transfer")
    again = tmp_path / "depth_transfer"
    shutil.copytree(out, again)
    saved = json.loads((again / "results.json").read_text(encoding="utf-8"))
    saved["runs_environment"]["wall_time_s"] = 4321.0  # the runs took long; a reanalysis takes seconds
    (again / "results.json").write_text(json.dumps(saved), encoding="utf-8")
    assert main(["study", "depth_transfer", "--quick", "--quiet", "--reanalyse", "yes", "--out", str(again)]) == 0
    saved = json.loads((again / "results.json").read_text(encoding="utf-8"))
    assert saved["runs_environment"]["wall_time_s"] == 4321.0 and saved["environment"]["wall_time_s"] < 4000
    assert "(4321 s on " in write_index(tmp_path).read_text(encoding="utf-8")


def test_index_also_links_a_committed_sweep_and_skips_other_folders(tmp_path):
    from nup.studies import write_index

    (tmp_path / "main_job").mkdir()
    (tmp_path / "main_job" / "sweep.json").write_text("{}")
    (tmp_path / "main_job" / "README.md").write_text("# sweep")
    (tmp_path / "scratch").mkdir()  # neither a study nor a sweep
    text = write_index(tmp_path).read_text(encoding="utf-8")
    assert "[main_job](main_job/README.md): a `nup sweep`" in text and "scratch" not in text


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

    cfg = config("study", "depth_transfer", "--max-width", "0", "--depths", "4,8", "--width-offset", "2",
                 "--parameterizations", "nup_harmonic", "--horizon", "50")
    assert cfg.max_width is None and cfg.depths == (4, 8) and cfg.width_offset == 2
    assert cfg.parameterizations == ("nup_harmonic",) and cfg.horizon == 50
    assert config("study", "depth_transfer").max_width is None  # capped νP is out of the headline
    assert config("study", "depth_transfer", "--max-width", "256").max_width == 256
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


def test_depth_transfer_chains_advance_on_their_own_largest_model_first(monkeypatch, tmp_path):
    """The scheduler: the runs waiting for a worker start largest model first, each chain's next depth
    starts at its own optimum (an lr three grid steps from where the chain began is reached by
    extension), and the grids end with η* interior."""
    from nup.studies.depth_transfer import runs as dt  # where run_grid finds train_one

    best = {"sp": 3, "nup": -2}  # each variant's optimal grid index, the same at every depth
    order = []

    def fake(cfg, task, variant, depth, j, seed):
        order.append((variant, depth))
        loss = 0.05 * (1 + (j - best[variant]) ** 2)
        return {"task": task, "parameterization": variant, "depth": depth, "j": j, "lr": dt.grid_lr(cfg, j),
                "seed": seed, "metric": {str(h): loss for h in dt.horizons(cfg)}, "time_s": 0.0}

    monkeypatch.setattr(dt, "train_one", fake)
    cfg = dt.Config(depths=(3, 6), tasks=("teacher",), parameterizations=("sp", "nup"), horizon=4, lr_points=3,
                    max_lr_points=10, seeds=2, n_train=256, teacher_shape=(4, 8, 2), sp_width=8, workers=1)
    runs, grids, _ = dt.run_grid(cfg, tmp_path, progress=False)
    sizes = dt._model_sizes(cfg, {"teacher": dt.load_task(cfg, "teacher")})
    assert sizes["teacher", order[0][0], order[0][1]] == max(sizes["teacher", v, 3] for v in best)
    # inline, each run is picked after the rounds it ended were queued: depth 3's nup round, then its
    # depth 6 (the largest), before sp's smaller depth-3 runs
    first_sp = order.index(("sp", 3))
    assert ("nup", 6) in order[:first_sp]
    for variant, j in best.items():
        for depth in cfg.depths:
            js = grids["teacher", variant, depth]
            assert js[0] < j < js[-1], (variant, depth, js)  # interior, whichever way the chain had to go
    assert grids["teacher", "sp", 6] == [2, 3, 4]  # depth 6 started at depth 3's optimum: no extension
    assert list(runs) == sorted(runs)
