"""Checkpoints of a ``nup train`` run: everything a resumed run needs to continue bit for bit.

``OUT/checkpoint.pt`` holds the step count, the model's and the optimizer's state dicts (NuP's
includes its schedule's and its base optimizer's), torch's CPU and CUDA RNG states, the length of
``metrics.jsonl`` at that step and the run's config. The data order needs no state: it is a
function of the seed and the step (:func:`nup.data.batches` with ``skip``). The file is written
atomically (:func:`nup.io.write_bytes_atomic`), so a run killed at any moment leaves the previous
checkpoint or the new one, and it is removed when the run finishes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from nup.io import write_bytes_atomic

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(path: str | Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    metrics_bytes: int, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write the state after ``step`` finished steps to ``path`` atomically."""
    state = {
        "format": FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "metrics_bytes": metrics_bytes,
        "config": config,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written for ``config``; ValueError (one line) when it belongs to another run."""
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}; start afresh "
                         "without --resume")
    diff = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
    if diff:
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(diff)}); resume with the "
                         "same flags, or choose another --out")
    return state


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load ``state`` into ``model``, ``optimizer`` and torch's RNGs; returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return int(state["step"])
