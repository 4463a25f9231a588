"""``nup bench``: the quick run writes every output with ratios, and the ratio arithmetic is exact."""

from __future__ import annotations

import csv
import json

import pytest

from nup import bench, cli


def test_quick_run_writes_ratio_tables(tmp_path):
    assert cli.main(["bench", "--quick", "--suite", "all", "--out", str(tmp_path)]) == 0
    for name in ("results.json", "results.csv", "results.md", "results.png", "pytest-benchmark.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads((tmp_path / "results.json").read_text())
    assert result["quick"] and result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    records = result["records"]
    kernel_ops = {r["op"] for r in records if r["suite"] == "kernels"}
    assert kernel_ops == {
        "linear_fwd", "linear_bwd_dx", "linear_bwd_dw", "gram_norm", "apply_materialized",
        "apply_small_batch", "multi_tensor_reduce", "multi_tensor_apply",
    }  # fmt: skip
    steps = [r for r in records if r["suite"] == "steps"]
    # nup_fused and wrapper mode run on CPU too (issue #9; before, nup_fused skipped without CUDA)
    providers = {r["provider"] for r in steps}
    expected = {"plain_torch", "numlp_sgd", "nup_dropin", "nup_fused", "adam", "nup_wrapper_adam", "adam_fused",
                "nup_wrapper_adam_fused", "unfused_stats"}
    assert expected <= providers
    for r in steps:
        if r["provider"] in ("nup_fused", "nup_dropin", "nup_wrapper_adam", "nup_wrapper_adam_fused"):
            assert r["ratio_vs_reference"] > 0 and r["reference"] in providers
            assert r["paired_ratio_vs_reference"] > 0  # timed in pairs with its own reference
    for fused in [r for r in steps if r["provider"] == "nup_fused"]:  # in pairs with drop-in, its rival
        q1, q3 = fused["paired_ratio_vs_rival_quartiles"]
        assert fused["rival"] == "nup_dropin" and 0 < q1 <= fused["paired_ratio_vs_rival"] <= q3
    assert all(r["paired_ratio_vs_rival"] is None for r in steps if r["provider"] != "nup_fused")
    launches = result["launches"]
    assert set(launches) >= {"plain_torch", "nup_dropin", "nup_fused", "nup_wrapper_adam"}, launches
    assert launches["nup_fused"]["per_layer"] <= 6 and launches["plain_torch"]["per_layer"] >= 1
    for r in records:
        assert r["median_ms"] > 0 and r["ratio_vs_torch"] > 0 and r["bytes_per_s"] > 0
        assert r["paired_ratio_vs_torch"] > 0
        if r["provider"] == r["baseline"]:
            assert r["ratio_vs_torch"] == 1.0 and r["paired_ratio_vs_torch"] == 1.0
    skipped = {s["test"].split("[")[-1].rstrip("]"): s["reason"] for s in result["skipped"]}
    if result["machine"]["device"] == "cpu":
        assert "torch.compile" in skipped["depth16-b16-compiled_stats"]
        assert "torch.compile" in skipped["depth16-b16-nup_dropin_compiled"]

    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) and "ratio_vs_torch" in rows[0]
    assert all(float(row["ratio_vs_torch"]) > 0 for row in rows)
    md = (tmp_path / "results.md").read_text()
    assert "## Full training steps" in md and "## Kernels" in md and "(1.00×)" in md
    assert "## Launches on the CUDA code path" in md and "NuP(base=Adam) / NuMLP + torch Adam" in md
    assert "depth 16, batch 16: nup drop-in (NuP) / plain torch" in md
    assert "depth 16, batch 16: nup fused / nup drop-in (NuP) = paired" in md


def _bench(suite: str, case: str, provider: str, baseline: str, median: float, **extra) -> dict:
    info = {"suite": suite, "case": case, "provider": provider, "baseline": baseline, **extra}
    return {"extra_info": info, "stats": {"median": median, "iqr": 0.0, "min": median, "rounds": 3}}


def test_summarize_divides_by_the_same_cases_baseline():
    raw = {
        "machine_info": {
            "nup": {
                "device": "cpu",
                "device_name": "X",
                "cores": 2,
                "torch_threads": 1,
                "torch": "t",
                "triton": None,
            }
        },
        "datetime": "2025-01-02T03:04:05",
        "benchmarks": [
            _bench("steps", "a", "plain_torch", "plain_torch", 0.002, bytes=4e6, flops=1e9),
            _bench("steps", "a", "nup_dropin", "plain_torch", 0.005, bytes=4e6, flops=1e9, paired_ratio=2.4,
                   reference="plain_torch", paired_ratio_ref=2.3, rival="nup_fused", paired_ratio_rival=0.9,
                   paired_ratio_rival_q=[0.8, 1.1]),
            _bench("steps", "b", "nup_dropin", "plain_torch", 0.001, bytes=None, flops=None),
            _bench("kernels", "a", "nup", "torch", 0.003, bytes=6e3, flops=None),
            _bench("kernels", "a", "torch", "torch", 0.001, bytes=6e3, flops=None),
        ],
    }
    result = bench.summarize(raw, [], suite="all", quick=False, command=[])
    by = {(r["suite"], r["case"], r["provider"]): r for r in result["records"]}
    assert by["steps", "a", "nup_dropin"]["ratio_vs_torch"] == pytest.approx(2.5)
    assert by["steps", "a", "nup_dropin"]["min_ratio_vs_torch"] == pytest.approx(2.5)
    assert by["steps", "a", "nup_dropin"]["paired_ratio_vs_torch"] == 2.4
    assert by["steps", "a", "nup_dropin"]["paired_ratio_vs_reference"] == 2.3
    assert by["steps", "a", "nup_dropin"]["ratio_vs_reference"] == pytest.approx(2.5)
    assert by["steps", "a", "nup_dropin"]["paired_ratio_vs_rival"] == 0.9
    assert by["steps", "a", "nup_dropin"]["paired_ratio_vs_rival_quartiles"] == [0.8, 1.1]
    assert by["steps", "b", "nup_dropin"]["paired_ratio_vs_rival"] is None
    assert by["steps", "a", "plain_torch"]["ratio_vs_torch"] == 1.0
    assert by["steps", "b", "nup_dropin"]["ratio_vs_torch"] is None  # its baseline did not run
    assert by["kernels", "a", "nup"]["ratio_vs_torch"] == pytest.approx(3.0)
    assert by["steps", "a", "nup_dropin"]["bytes_per_s"] == pytest.approx(8e8)
    assert by["steps", "a", "nup_dropin"]["tflops"] == pytest.approx(0.2)
    assert result["date"] == "2025-01-02" and by["steps", "a", "plain_torch"]["device_name"] == "X"
    assert bench.machine_slug(result["machine"]) == "cpu-x-2c-1t"


def test_missing_pytest_benchmark_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pytest-benchmark" in err and "\n" not in err
