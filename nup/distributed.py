"""Several processes: the torchrun launch of ``nup train``, DDP, and NuP on sharded (DTensor) parameters.

What runs where:

- **DDP** (:func:`wrap_ddp`): every rank holds whole parameters. DDP averages the gradients
  during ``backward``, so NuP's step sees the same gradients on every rank and computes the same
  statistics from them, with no collective of its own. The fused path (updates inside
  ``backward``, before DDP's all-reduce) is refused.
- **FSDP2 / DTensor** (:func:`fully_shard_model`, or any DTensor parameters): each rank holds a
  shard of ``P``, of its gradient and of ``C`` (made by ``zeros_like(P)``, so sharded like ``P``).
  :class:`ShardedStats` computes every tensor's partial ``‖D‖²``, ``⟨D, C⟩`` and ``‖C‖²`` on the
  local shards, packs them into one float64 ``[3, n]`` tensor, all-reduces it once per step over the
  mesh dimensions the tensors are sharded on (replicated dimensions are left out), and applies the
  update to the local shards. ``‖C‖`` is then exact at every step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from nup_kernels import multi_tensor

ARGV_ENV = "NUP_DISTRIBUTED_ARGV"  # launch() -> workers: their ``nup`` arguments, as a JSON list


# ---------------------------------------------------------------------------------------------
# launch and process group
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_flags(values: dict) -> list[str]:
    """Command-line flags for ``values``: ``--name=value``, ``--name`` / ``--no-name`` for booleans, None left out."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags.append(f"{flag}={value}")
    return flags


def torchrun_command(nproc: int, port: int) -> list[str]:
    """``python -m torch.distributed.run … -m nup.distributed``: ``nproc`` workers on 127.0.0.1:``port``.

    The workers' ``nup`` arguments travel in the environment (:data:`ARGV_ENV`), not on this line:
    torchrun's parser would read ``--m`` (nup's width flag) as an ambiguous abbreviation of its own.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "nup.distributed"]


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``nup ARGV`` in ``nproc`` data-parallel processes through torchrun; return its exit status.

    ``argv`` is the command line after the program name, e.g. ``["train", "--steps=100", "--nproc=2"]``;
    the workers see :func:`launched` true and so do not launch again.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    env = {**os.environ, ARGV_ENV: json.dumps(list(argv))}
    return subprocess.run(torchrun_command(nproc, free_port()), env=env, check=False).returncode


def init_from_env(device: str | torch.device = "cpu") -> torch.device:
    """Join the process group torchrun describes (gloo for CPU, NCCL for CUDA); return this rank's device.

    Without a launcher (or with ``WORLD_SIZE=1``) nothing is initialized and ``device`` is returned.
    On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process: the rank that writes files and prints."""
    return world()[0] == 0


def close() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the ranks (one all-reduce; ``t`` itself in a single process).

    For logging: equal batch slices make the mean of the ranks' losses the global batch's loss.
    """
    size = world()[1]
    if size == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / size


def local_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's equal slice (along dim 0) of a global batch that every rank holds whole.

    With DDP averaging gradients, equal slices give exactly the gradient of the global batch's mean loss.
    """
    rank, size = world()
    out = []
    for t in tensors:
        if t.shape[0] % size:
            raise ValueError(f"batch of {t.shape[0]} does not split evenly over {size} processes")
        out.append(t.chunk(size)[rank] if size > 1 else t)
    return tuple(out)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes run, else ``model`` itself.

    Build the optimizer on the unwrapped model (its parameter names stay unprefixed) and run the
    forward through the wrapper.
    """
    if world()[1] == 1:
        return model
    if any(getattr(m, "fused_update", None) is not None for m in model.modules()):
        raise ValueError("fused NuP applies updates inside backward, before DDP averages the gradients; "
                         "use the default (unfused) NuP with several processes")
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def fully_shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Shard ``model`` with FSDP2: one unit per module of ``model.layers`` (if any), then the root.

    The parameters become DTensors sharded on dim 0; their NuP metadata (``_nup_meta``) is carried
    over by name. Build NuP after this call.
    """
    from torch.distributed.fsdp import fully_shard

    metas = {name: p._nup_meta for name, p in model.named_parameters() if hasattr(p, "_nup_meta")}
    for layer in getattr(model, "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, p in model.named_parameters():
        if name in metas:
            p._nup_meta = metas[name]
    return model


# ---------------------------------------------------------------------------------------------
# NuP on DTensor shards
def _local(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in ts]


def _reduce_groups(params: Sequence[torch.Tensor]) -> list[tuple[list, torch.Tensor | None]]:
    """``[(process groups, rows)]``, one per distinct (mesh, shard dims); ``rows`` None: every tensor."""
    from torch.distributed.tensor import DTensor

    keys = []
    for p in params:
        if not isinstance(p, DTensor):
            keys.append(None)  # a whole tensor on every rank: its local sums are already global
            continue
        if any(pl.is_partial() for pl in p.placements):
            raise ValueError(f"NuP cannot step a parameter with a Partial placement {p.placements}")
        dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
        keys.append((p.device_mesh, dims) if dims else None)
    out = []
    for key in dict.fromkeys(k for k in keys if k is not None):
        mesh, dims = key
        rows = [i for i, k in enumerate(keys) if k == key]
        index = None if len(rows) == len(keys) else torch.tensor(rows, device=params[0].device)
        out.append(([mesh.get_group(d) for d in dims], index))
    return out


class ShardedStats:
    """NuP's reduce and apply on the local shards of DTensor parameters, with one packed all-reduce.

    ``reduce`` and ``apply`` have the signatures of :func:`nup_kernels.multi_tensor.multi_tensor_reduce`
    and ``multi_tensor_apply`` and run them on the local shards (Triton on CUDA, torch on CPU). In
    ``init`` mode the cumulatives hold ``P_0``, and ``C = P − P_0`` is formed locally.
    """

    def __init__(self, params: Sequence[torch.Tensor], init_mode: bool = False) -> None:
        self.params, self.init_mode = list(params), init_mode
        self.groups = _reduce_groups(self.params)
        self._c: list[torch.Tensor] | None = None

    def reduce(
        self, directions: Sequence[torch.Tensor], cumulatives: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global ``‖D‖²``, ``⟨D, C⟩`` and ``‖C‖²`` per tensor, float64 ``[n]`` each (accumulated in fp64).

        ``⟨D, C⟩`` is set to 0 where ``D`` is not finite (that tensor's step is skipped).
        """
        c = _local(cumulatives)
        if self.init_mode:
            c = [p.float() - p0.float() for p, p0 in zip(_local(self.params), c, strict=True)]
        self._c = c
        packed = torch.stack(multi_tensor.multi_tensor_reduce(_local(directions), c))  # [3, n]: all it sends
        for groups, rows in self.groups:
            part = packed if rows is None else packed.index_select(1, rows)
            for group in groups:
                dist.all_reduce(part, group=group)
            if rows is not None:
                packed.index_copy_(1, rows, part)
        d_sq, dc, c_sq = packed.unbind()
        return d_sq, torch.where(torch.isfinite(d_sq), dc, 0.0), c_sq

    def apply(
        self,
        params: Sequence[torch.Tensor],
        directions: Sequence[torch.Tensor],
        cumulatives: Sequence[torch.Tensor],
        coefs: torch.Tensor,
    ) -> None:
        """``P_i += coefs[i]·D_i`` (and ``C_i`` likewise, unless in ``init`` mode) on the local shards."""
        c = self._c if self.init_mode and self._c is not None else _local(cumulatives)
        multi_tensor.multi_tensor_apply(_local(params), _local(directions), c, coefs)


def stat_reducer(params: Sequence[torch.Tensor], init_mode: bool = False) -> ShardedStats | None:
    """A :class:`ShardedStats` when any parameter is a DTensor, else None (plain tensors, DDP)."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist before this import
        return None
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params):
        return None
    return ShardedStats(params, init_mode)


if __name__ == "__main__":  # a worker started by launch() through torchrun
    from nup.cli import main

    sys.exit(main(json.loads(os.environ[ARGV_ENV])))
