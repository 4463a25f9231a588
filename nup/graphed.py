"""A whole training step (forward, backward, ``opt.step()``) as one call, captured in a CUDA graph.

On CUDA the step is warmed up on a side stream, then captured once; each call copies the batch into
the captured input tensors and replays the graph: one launch per step, whatever the depth. On CPU
the same step runs eagerly. NuP keeps every statistic, its cumulative buffers, the fused path's
per-step buffers and the schedule's multiplier in place, which is what lets a replay read what the
previous one wrote.

Limits of a captured step: the batch shape is fixed; ``group['lr']`` changes and a schedule whose
next multiplier is decided on the host take effect only in a new capture; the exact ``‖C‖``
recompute of ``recompute_every`` is not replayed (the identity carries ``‖C‖``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nup import step_core as core


def _eager_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, batch: Any) -> torch.Tensor:
    opt.zero_grad(set_to_none=False)
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    return loss.detach()


def _copy_into(dst: Any, src: Any) -> None:
    if torch.is_tensor(dst):
        dst.copy_(src, non_blocking=True)
    else:
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)


def graphed_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    example_batch: Any,
    warmup: int = 3,
) -> Callable[[Any], torch.Tensor]:
    """``step(batch) -> loss``: one training step of ``model`` with ``opt`` (any optimizer; NuP fused or not).

    ``loss_fn(model, batch)`` returns the scalar loss; ``example_batch`` (a tensor or a tuple of
    tensors on the model's device) fixes the shapes. On CUDA the ``warmup`` eager steps run first
    (they train: they are real steps, on ``example_batch``), then the step is captured; on CPU every
    call is an eager step. The returned loss is a device tensor (no host sync).
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return lambda batch: _eager_step(model, opt, loss_fn, batch)
    static = _clone(example_batch)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            _eager_step(model, opt, loss_fn, static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = _eager_step(model, opt, loss_fn, static)
    host_counters = _host_counters(opt)
    host_counters(-1)  # the capture ran the host code but no kernel: it was not a step

    def step(batch: Any) -> torch.Tensor:
        _copy_into(static, batch)
        graph.replay()
        host_counters(1)
        return static_loss

    return step


def _clone(batch: Any) -> Any:
    return batch.clone() if torch.is_tensor(batch) else type(batch)(_clone(b) for b in batch)


def _host_counters(opt: torch.optim.Optimizer) -> Callable[[int], None]:
    """What a replay cannot do: move NuP's host step count and its schedule's by ``k`` (no-op for others)."""
    g = opt.state.get(core.GLOBAL_KEY) if hasattr(opt, "state") else None
    schedule = getattr(opt, "schedule", None)

    def advance(k: int) -> None:
        if g is not None:
            g["step"] += k
        if schedule is not None:
            schedule.steps_done += k

    return advance
