"""The memory-traffic table of DESIGN.md, row by row, and its sum over an MLP."""

import pytest

from nup_kernels.traffic import PASSES, model_traffic, traffic

# DESIGN.md "Memory traffic": path -> (W, G, C or P_0, total) in parameter-sized passes
TABLE = {
    "plain_sgd": (4, 2, 0, 6),
    "unfused_stats": (4, 5, 4, 13),
    "fused_materialized": (4, 2, 2, 8),
    "fused_small_batch": (4, 0, 2, 6),
    "fused_small_batch_init": (4, 0, 1, 5),
    "lower_bound": (3, 0, 1, 4),
}


@pytest.mark.parametrize("path", sorted(TABLE))
def test_every_row(path):
    w, g, c, total = TABLE[path]
    out = traffic(1000, path, dtype_bytes=2)
    assert (out["w"], out["g"], out["c"], out["total_passes"]) == (w, g, c, total)
    assert out["bytes"] == total * 1000 * 2
    assert "recompute_flops" not in out
    flops = traffic(1000, path, batch=32)["recompute_flops"]
    assert flops == (2 * 32 * 1000 if g == 0 else 0)


def test_table_has_no_extra_rows():
    assert set(PASSES) == set(TABLE)


def test_fused_small_batch_costs_what_plain_sgd_costs():
    assert traffic(10**6, "fused_small_batch")["bytes"] == traffic(10**6, "plain_sgd")["bytes"]
    assert traffic(10**6, "unfused_stats")["bytes"] > 2 * traffic(10**6, "fused_small_batch")["bytes"]


def test_model_traffic_sums_the_layers():
    widths = [784, 256, 256, 10]
    n_params = 784 * 256 + 256 * 256 + 256 * 10
    out = model_traffic(widths, "fused_materialized", batch=64, dtype_bytes=4)
    assert out["n_params"] == n_params
    assert out["total_passes"] == 8
    assert out["bytes"] == 8 * n_params * 4
    assert out["recompute_flops"] == 0
    small = model_traffic(widths, "fused_small_batch", batch=64)
    assert small["recompute_flops"] == 2 * 64 * n_params
    layers = [(784, 256), (256, 256), (256, 10)]
    assert small["bytes"] == sum(traffic(a * b, "fused_small_batch")["bytes"] for a, b in layers)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown path 'fused'"):
        traffic(10, "fused")
    with pytest.raises(ValueError, match="unknown path"):
        model_traffic([4, 4], "adam")
    with pytest.raises(ValueError, match="batch"):
        traffic(10, "plain_sgd", batch=0)
    with pytest.raises(ValueError, match="widths"):
        model_traffic([4], "plain_sgd")
    with pytest.raises(ValueError, match="n_params"):
        traffic(-1, "plain_sgd")
