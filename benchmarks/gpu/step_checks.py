"""Sections ``fused_step`` and ``host_sync``: the fused step against the drop-in step, and no host syncs."""

from __future__ import annotations

import contextlib
import copy
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from gpu.helpers import bits, env_var, guarded, matmul_precision, pinned_configs, rel_rms, shape_str, sync
from gpu.record import Run
from gpu.settings import PRECISIONS, STAT_KEYS, STEP_TOLERANCE


def _nup_model(run: Run, act: str = "relu", bias: bool = False) -> Any:
    n_in, n_out, depth, m, _ = run.sizes.step_check
    torch.manual_seed(0)
    model = run.k.NuMLP(n_in, n_out, depth, m, activation=act, bias=bias, sigma_b2=0.3 if bias else 0.0)
    return model.to(run.device)


def _nup_opt(run: Run, model: torch.nn.Module, fused: bool) -> Any:
    k = run.k
    return k.NuP(
        model.named_parameters(), lr=0.1, schedule=k.make_schedule("geometry"), recompute_every=3, fused=fused
    )


def _data(run: Run, batch: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(batch, n_in, generator=g).to(run.device),
        torch.randint(0, n_out, (batch,), generator=g).to(run.device),
    )


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def check_fused_vs_drop_in(run: Run, prec: str, path: str, act: str, bias: bool) -> None:
    sec = "fused_step"
    n_in, n_out, depth, m, batch = run.sizes.step_check
    shape = shape_str(depth=depth, m=m, B=batch, act=act, bias=bias, path=path)
    with matmul_precision(PRECISIONS[prec][1]), env_var("NUP_UPDATE_PATH", path):
        m1 = _nup_model(run, act, bias)
        m2 = copy.deepcopy(m1)
        o1, o2 = _nup_opt(run, m1, False), _nup_opt(run, m2, True)
        p0 = [p.detach().clone() for p in m1.parameters()]
        x, y = _data(run, batch, n_in, n_out)
        for _ in range(5):
            _train_step(m1, o1, x, y)
            _train_step(m2, o2, x, y)
    tol = STEP_TOLERANCE[prec]
    err = max(rel_rms(q - q0, p - q0) for p, q, q0 in zip(m1.parameters(), m2.parameters(), p0))
    run.check(
        sec, "fused_vs_drop_in.displacement", shape, prec, err, tol, metric="max_tensor rel_rms(P - P_0)"
    )
    v1, v2 = o1.stat_vectors(), o2.stat_vectors()
    for key in STAT_KEYS:
        a, b = v2[key].double(), v1[key].double()
        err = (a - b).abs().max().item() if key in ("cos", "skipped") else rel_rms(a, b)
        run.check(
            sec,
            f"fused_vs_drop_in.{key}",
            shape,
            prec,
            err,
            tol,
            metric="max abs" if key in ("cos", "skipped") else "rel_rms",
        )
    run.check(sec, "fused_vs_drop_in.step_count", shape, prec, abs(v1["step"] - v2["step"]), 0, metric="abs")
    run.check(
        sec,
        "fused_vs_drop_in.no_grad_written",
        shape,
        prec,
        sum(p.grad is not None for p in m2.parameters()),
        0,
        metric="params with .grad",
    )


def check_repeatable(run: Run, fused: bool) -> None:
    sec, name = "fused_step", "bitwise_repeatable." + ("fused" if fused else "drop_in")
    n_in, n_out, depth, m, batch = run.sizes.step_check
    shape = shape_str(depth=depth, m=m, B=batch)
    runs = []
    x, y = _data(run, batch, n_in, n_out)
    for _ in range(2):
        model = _nup_model(run)
        opt = _nup_opt(run, model, fused)
        for _ in range(3):
            _train_step(model, opt, x, y)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.stat_vectors()))
    differ = sum(int((bits(p) != bits(q)).sum()) for p, q in zip(runs[0][0], runs[1][0]))
    differ += sum(int((bits(runs[0][1][k]) != bits(runs[1][1][k])).sum()) for k in STAT_KEYS)
    run.check(sec, name, shape, "fp32", differ, 0, metric="differing entries")


def section_fused_step(run: Run) -> None:
    precs = ["fp32"]
    if run.cuda:
        precs.append("tf32")
    else:
        run.skip("fused_step", "fused_vs_drop_in[tf32]", "TF32 needs CUDA")
    with pinned_configs(run.k.la, -1):
        for prec in precs:
            cases = (("relu", False), ("tanh", True)) if prec == "fp32" else (("relu", False),)
            for path in ("small_batch", "materialized"):
                for act, bias in cases:
                    guarded(
                        run,
                        "fused_step",
                        "fused_vs_drop_in",
                        f"{path},{act}",
                        prec,
                        lambda p=prec, q=path, a=act, b=bias: check_fused_vs_drop_in(run, p, q, a, b),
                    )
        with matmul_precision("highest"):
            for fused in (True, False):
                guarded(
                    run,
                    "fused_step",
                    "bitwise_repeatable",
                    "",
                    "fp32",
                    lambda f=fused: check_repeatable(run, f),
                )


def section_host_sync(run: Run) -> str | None:
    """No host sync inside ``opt.step()`` (drop-in) nor inside ``backward(); opt.step()`` (fused).

    Without CUDA the same steps run with no sync-debug mode, and the section reports itself skipped.
    """
    sec = "host_sync"
    n_in, n_out, _, _, batch = run.sizes.step_check
    x, y = _data(run, batch, n_in, n_out)
    with pinned_configs(run.k.la, -1), matmul_precision("highest"):
        for fused in (False, True):
            name = "no_sync." + ("fused_backward_and_step" if fused else "drop_in_step")

            def one(fused: bool = fused, name: str = name) -> None:
                model = _nup_model(run)
                opt = _nup_opt(run, model, fused)
                for _ in range(2):  # warm-up: compiles, caches the launch tables and scales
                    _train_step(model, opt, x, y)
                sync(run)
                error = None
                for _ in range(3):
                    loss = F.cross_entropy(model(x), y)
                    if not fused:
                        loss.backward()
                    try:
                        with sync_debug(run):
                            if fused:
                                loss.backward()
                            opt.step()
                            opt.stat_vectors()
                    except RuntimeError:
                        error = traceback.format_exc()
                    opt.zero_grad()
                    if error:
                        break
                if run.cuda:
                    run.check(
                        sec,
                        name,
                        shape_str(B=batch),
                        "fp32",
                        0 if error is None else 1,
                        0,
                        metric="host syncs raised",
                        traceback=error,
                    )
                elif error is not None:
                    raise RuntimeError(error)

            guarded(run, sec, name, shape_str(B=batch), "fp32", one)
    return None if run.cuda else "the sync-debug mode needs CUDA (the steps ran, nothing was checked)"


@contextlib.contextmanager
def sync_debug(run: Run) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block (nothing on CPU)."""
    if not run.cuda:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
