"""Sections ``timing_step*``: the full training step against the plain, unfused and compiled baselines."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gpu.helpers import bench, first_call_s, free_memory, guarded, matmul_precision, shape_str
from gpu.record import Run
from gpu.settings import PRECISIONS, STEP_VARIANTS
from gpu.step_checks import _data, _train_step


def mlp_forward(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The plain MLP: ``F.linear`` + ReLU per hidden layer (α folded into the weights)."""
    for w in ws[:-1]:
        x = torch.relu(F.linear(x, w))
    return F.linear(x, ws[-1])


def unfused_stats_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    cumulatives: list[torch.Tensor],
    step_sizes: list[float],
    u: torch.Tensor,
) -> torch.Tensor:
    """The unfused PyTorch νP-SGD step with statistics (DESIGN.md's 13P row), one tensor at a time.

    Per tensor: ``‖G‖``, ``⟨G, C⟩``, ``‖C‖``, then ``P += coef·G`` and ``C += coef·G`` with
    ``coef = −u/‖G‖`` (``step_sizes``: the floats ``u``; ``u``: the same as an fp32 ``[n]``
    tensor). Returns fp32 ``[n, 4]``: ``‖G‖``, ``⟨ΔP, C⟩``, ``‖C‖`` and the cosine.
    """
    rows = []
    for p, g, c, step in zip(params, grads, cumulatives, step_sizes):
        g_norm = g.norm()
        dot = (g * c).sum()
        c_norm = c.norm()
        coef = -step / g_norm
        p.addcmul_(g, coef)
        c.addcmul_(g, coef)
        rows.append(torch.stack((g_norm, coef * dot, c_norm)))
    stats = torch.stack(rows).float()
    cos = stats[:, 1] / (stats[:, 2] * u).clamp_min(1e-30)
    return torch.cat((stats, cos[:, None]), dim=1)


def make_step(
    run: Run, kind: str, base: Any, x: torch.Tensor, y: torch.Tensor, update: Callable | None = None
) -> Callable[[], None]:
    """One training step of variant ``kind`` on a copy of ``base`` (a NuMLP)."""
    k = run.k
    if kind in ("drop_in", "fused"):
        model = copy.deepcopy(base)
        opt = k.NuP(
            model.named_parameters(), lr=0.05, schedule=k.make_schedule("geometry"), fused=kind == "fused"
        )
        return lambda: _train_step(model, opt, x, y)
    ws = [(layer.alpha * layer.weight.detach()).clone().requires_grad_(True) for layer in base.layers]
    if kind == "plain":
        sgd = torch.optim.SGD(ws, lr=1e-3, fused=True)

        def plain() -> None:
            F.cross_entropy(mlp_forward(ws, x), y).backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        return plain
    cs = [torch.zeros_like(w) for w in ws]
    sizes = [0.05 * layer.weight_meta.scale for layer in base.layers]
    u = torch.tensor(sizes, device=x.device)
    update = update or unfused_stats_update

    def unfused() -> None:
        F.cross_entropy(mlp_forward(ws, x), y).backward()
        with torch.no_grad():
            update([w.detach() for w in ws], [w.grad for w in ws], cs, sizes, u)
        for w in ws:
            w.grad = None

    return unfused


def _step_model(run: Run, depth: int, dtype: torch.dtype) -> Any:
    s = run.sizes
    torch.manual_seed(0)
    model = run.k.NuMLP(s.step_io[0], s.step_io[1], depth, s.step_m, max_width=s.step_max_width)
    return model.to(device=run.device, dtype=dtype)


def _fused_path(run: Run, batch: int, dtype: torch.dtype) -> str:
    path = run.k.apply.choose_update_path(batch, 1, 1, dtype)
    return "fused_small_batch" if path == "small_batch" else "fused_materialized"


def _record_variant(
    run: Run,
    sec: str,
    label: str,
    kind: str,
    ms: float,
    first: float,
    widths: list[int],
    batch: int,
    dtype: torch.dtype,
    shape: str,
) -> None:
    path = {
        "plain": "plain_sgd",
        "unfused": "unfused_stats",
        "compiled": "unfused_stats",
        "drop_in": None,
        "fused": _fused_path(run, batch, dtype),
    }[kind]
    extra: dict[str, Any] = {"first_call_s": first}
    if path is not None:
        t = run.k.traffic.model_traffic(widths, path, batch, torch.finfo(dtype).bits // 8)
        extra.update(traffic_path=path, traffic_bytes=t["bytes"], gbps=t["bytes"] / ms / 1e6)
    run.timing(sec, f"step:{kind}", shape, label, ms, **extra)


def section_timing_step(run: Run, dtype_name: str, depths: tuple[int, ...]) -> None:
    """Fused step against plain, unfused and drop-in steps on the depth × batch grid."""
    sec = "timing_step" if dtype_name == "fp32" else "timing_step_bf16"
    label = dtype_name if dtype_name != "fp32" or not run.cuda else "fp32+tf32"
    with matmul_precision("high"):
        for depth in depths:
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, f"depth={depth}", reason)
                continue
            time_depth(run, sec, label, dtype_name, depth)
            free_memory(run)


def time_depth(run: Run, sec: str, label: str, dtype_name: str, depth: int) -> None:
    s = run.sizes
    dtype = PRECISIONS[dtype_name][0]
    base = _step_model(run, depth, dtype)
    for batch in s.batches:
        shape = shape_str(depth=depth, B=batch, max_width=max(base.widths))
        x, y = _data(run, batch, s.step_io[0], s.step_io[1])
        x = x.to(dtype)
        result = run.steps.setdefault((dtype_name, depth, batch), {"widths": base.widths})
        for kind in STEP_VARIANTS:
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, f"{kind}[{shape}]", reason)
                continue

            def one(
                kind: str = kind,
                shape: str = shape,
                x: torch.Tensor = x,
                y: torch.Tensor = y,
                batch: int = batch,
                result: dict = result,
            ) -> None:
                fn = make_step(run, kind, base, x, y)
                first = first_call_s(run, fn)
                ms = bench(run, fn)
                result[kind] = ms
                _record_variant(run, sec, label, kind, ms, first, base.widths, batch, dtype, shape)

            guarded(run, sec, f"step:{kind}", shape, label, one)
            free_memory(run)
        _compare_step(run, sec, label, shape, result, batch == min(s.batches))
        run.write()


def _compare_step(run: Run, sec: str, label: str, shape: str, r: dict[str, Any], small_batch: bool) -> None:
    if "fused" not in r:
        return
    fused = r["fused"]
    if "plain" in r:
        e = run.timing(
            sec,
            "step:fused_vs_plain",
            shape,
            label,
            fused,
            baseline="plain",
            baseline_ms=r["plain"],
            ratio=fused / r["plain"],
            ratio_def="fused ms / plain ms",
            target_kind="fused_vs_plain",
        )
        if small_batch:
            e["stretch_target"], e["stretch_passed"] = (
                "fused_vs_plain <= 1.0 at small batch",
                e["ratio"] <= 1.0,
            )
    if "unfused" in r:
        run.timing(
            sec,
            "step:fused_vs_unfused",
            shape,
            label,
            fused,
            baseline="unfused",
            baseline_ms=r["unfused"],
            ratio=r["unfused"] / fused,
            ratio_def="unfused ms / fused ms",
            target_kind="fused_vs_unfused",
        )
    if "drop_in" in r and "plain" in r:
        run.timing(
            sec,
            "step:drop_in_vs_plain",
            shape,
            label,
            r["drop_in"],
            baseline="plain",
            baseline_ms=r["plain"],
            ratio=r["drop_in"] / r["plain"],
            ratio_def="drop-in ms / plain ms (informational)",
        )


def section_timing_step_compiled(run: Run) -> None:
    """torch.compile of the unfused statistics step, once per depth, against the fused step."""
    sec, s = "timing_step_compiled", run.sizes
    backend = "inductor" if run.cuda else "eager"  # inductor's CPU C++ build alone takes minutes
    run.data["settings"]["step_variants"]["compiled"] += f" (backend={backend!r})"
    with matmul_precision("high"):
        for depth in s.depths:
            if (reason := run.budget_reason()) is not None:
                run.skip(sec, f"depth={depth}", reason)
                continue
            if run.cuda and not run.tiny and run.budget_s - run.elapsed() < 30:
                run.skip(sec, f"depth={depth}", "less than 30 s of budget left for torch.compile")
                continue
            time_compiled_depth(run, sec, depth, backend)
            free_memory(run)


def time_compiled_depth(run: Run, sec: str, depth: int, backend: str) -> None:
    s = run.sizes
    label = "fp32+tf32" if run.cuda else "fp32"
    torch._dynamo.reset()
    compiled = torch.compile(unfused_stats_update, backend=backend)
    base = _step_model(run, depth, torch.float32)
    error = None
    for batch in s.batches:
        shape = shape_str(depth=depth, B=batch, max_width=max(base.widths))
        if (reason := run.budget_reason()) is not None:
            run.skip(sec, f"compiled[{shape}]", reason)
            continue
        r = run.steps.setdefault(("fp32", depth, batch), {"widths": base.widths})
        if error is None:
            x, y = _data(run, batch, s.step_io[0], s.step_io[1])
            try:
                fn = make_step(run, "compiled", base, x, y, update=compiled)
                first = first_call_s(run, fn)
                r["compiled"] = bench(run, fn)
                _record_variant(
                    run,
                    sec,
                    label,
                    "compiled",
                    r["compiled"],
                    first,
                    base.widths,
                    batch,
                    torch.float32,
                    shape,
                )
            except Exception:
                error = traceback.format_exc()
        if error is not None:
            run.timing(sec, "step:compiled", shape, label, None, error=error[-4000:])
        elif "fused" in r:
            run.timing(
                sec,
                "step:fused_vs_compiled",
                shape,
                label,
                r["fused"],
                baseline="compiled",
                baseline_ms=r["compiled"],
                ratio=r["compiled"] / r["fused"],
                ratio_def="compiled ms / fused ms",
                target_kind="fused_vs_compiled",
            )
        free_memory(run)
        run.write()
