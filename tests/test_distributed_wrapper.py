"""FSDP2 + wrapper mode + a non-finite gradient (issue #13, failure 10: ``aten.where`` mixed Tensor and
DTensor). Two CPU ranks (gloo) against one process on the same global batches."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup import distributed as nd

WORLD, STEPS, NAN_AT, BATCH = 2, 4, 1, 8


def _model() -> NuMLP:
    torch.manual_seed(0)
    return NuMLP(6, 3, 3, 3, activation="tanh", bias=True, sigma_b2=0.05)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model, split=lambda *t: t) -> tuple[NuP, list]:
    opt = NuP(model.named_parameters(), lr=0.05, base=torch.optim.Adam(model.parameters(), lr=1e-2))
    snapshots = []
    for step in range(STEPS):
        x, y = split(*_batch(step))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if step == NAN_AT:  # one entry of the first weight's gradient (on rank 0's shard)
            grad = model.layers[0].weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad)[0, 0] = float("nan")
        opt.step()
        snapshots.append({n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                          for n, p in model.named_parameters()})  # fmt: skip
    return opt, snapshots


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))  # fmt: skip
    torch.set_num_threads(1)
    nd.init_from_env("cpu")
    try:
        opt, snaps = _train(nd.fully_shard_model(_model()), nd.local_batch)
        torch.save({"snaps": snaps, "skipped": opt.stat_vectors()["skipped"].clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        nd.close()


def test_fsdp2_wrapper_skips_a_non_finite_gradient_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(nd.free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ref_opt, ref = _train(_model())
    n = len(ref[0])
    assert ref_opt.stat_vectors()["skipped"].tolist() == [1] * n
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["skipped"].tolist() == [1] * n  # the whole step skipped, on both ranks alike
        for name in ref[0]:
            assert torch.equal(r["snaps"][NAN_AT][name], r["snaps"][NAN_AT - 1][name]), name  # nothing moved
            for step in range(STEPS):
                torch.testing.assert_close(r["snaps"][step][name], ref[step][name], rtol=1e-5, atol=1e-6)
