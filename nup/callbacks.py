"""Logging callbacks for PyTorch Lightning and ``transformers.Trainer`` (both optional imports).

Both log :meth:`nup.NuP.log_dict` (per tensor: cos, update norm, ‖C‖, coherence, the *effective*
lr ``group lr·λ``, skipped steps; the mean multiplier λ) for every NuP optimizer the trainer drives.
LR monitors of both frameworks log ``group['lr']``, which leaves out NuP's multiplier; ``nup/lr/*``
is the rate actually applied.

- Lightning: ``Trainer(callbacks=[nup.callbacks.NuPLightningCallback()])``; logs every
  ``trainer.log_every_n_steps`` steps to every logger of the trainer.
- transformers: ``nup.callbacks.add_to_trainer(trainer)`` (or put :func:`NuPTrainerCallback` first
  in ``trainer.callback_handler.callbacks``); adds the keys to the logs of every ``on_log``, so the
  trainer's reporting integrations (TensorBoard, W&B, ...) and ``state.log_history`` carry them.

The classes are built on first use, so importing this module needs neither framework.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from nup.optim import NuP


def nup_optimizers(optimizers: Any) -> list[NuP]:
    """The NuP optimizers among ``optimizers`` (one or a list; framework wrappers are unwrapped)."""
    if optimizers is None:
        return []
    items = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    out = []
    for opt in items:
        while not isinstance(opt, NuP) and hasattr(opt, "optimizer"):  # LightningOptimizer, AcceleratedOptimizer
            opt = opt.optimizer
        if isinstance(opt, NuP):
            out.append(opt)
    return out


def model_names(opt: NuP, model: torch.nn.Module | None) -> dict[str, str]:
    """``{param{i}: name in model}`` for the tensors ``opt`` holds without a name (frameworks often
    build optimizers from ``model.parameters()``)."""
    if model is None:
        return {}
    by_id = {id(p): name.replace("_orig_mod.", "") for name, p in model.named_parameters()}
    out, i = {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            if "param_names" not in group and id(p) in by_id:
                out[f"param{i}"] = by_id[id(p)]
            i += 1
    return out


def collect(optimizers: Any, prefix: str = "nup", model: torch.nn.Module | None = None) -> dict[str, float]:
    """One flat dict over every NuP in ``optimizers``; the second and later get ``{prefix}{i}/`` keys.

    With ``model``, tensors the optimizer holds without names are keyed by their names in ``model``.
    """
    logs: dict[str, float] = {}
    for i, opt in enumerate(nup_optimizers(optimizers)):
        names = model_names(opt, model)
        for key, value in opt.log_dict(prefix if i == 0 else f"{prefix}{i}").items():
            head, _, name = key.rpartition("/")
            logs[f"{head}/{names[name]}" if name in names else key] = value
    return logs


@functools.cache
def _lightning_class() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("NuPLightningCallback needs PyTorch Lightning: pip install lightning") from None

    class NuPLightningCallback(Callback):
        """Logs NuP's statistics every ``trainer.log_every_n_steps`` optimizer steps (``every`` to override)."""

        def __init__(self, every: int | None = None, prefix: str = "nup") -> None:
            if every is not None and every < 1:
                raise ValueError(f"every must be >= 1 (or None: the trainer's log_every_n_steps), got {every}")
            self.every, self.prefix = every, prefix

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            every = self.every or trainer.log_every_n_steps
            if trainer.global_step == 0 or trainer.global_step % every or not trainer.loggers:
                return
            logs = collect(trainer.optimizers, self.prefix, pl_module)
            if logs and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(logs, step=trainer.global_step)

    return NuPLightningCallback


@functools.cache
def _transformers_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError("NuPTrainerCallback needs transformers: pip install transformers") from None

    class NuPTrainerCallback(TrainerCallback):
        """Adds NuP's statistics to the trainer's logs at every ``on_log`` (needs to run first)."""

        def __init__(self, prefix: str = "nup") -> None:
            self.prefix = prefix

        def on_log(self, args, state, control, logs=None, optimizer=None, model=None, **kwargs) -> None:
            if logs is None or "loss" not in logs:  # training logs only, not the eval ones
                return
            stats = collect(optimizer, self.prefix, model)
            logs.update(stats)
            history = state.log_history
            if history and history[-1].get("step") == state.global_step:  # the trainer appended a copy
                history[-1].update(stats)

    return NuPTrainerCallback


def add_to_trainer(trainer: Any, prefix: str = "nup") -> Any:
    """Put a :class:`NuPTrainerCallback` first in ``trainer``'s callbacks, ahead of the reporting ones."""
    callback = _transformers_class()(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def __getattr__(name: str) -> type:
    if name == "NuPLightningCallback":
        return _lightning_class()
    if name == "NuPTrainerCallback":
        return _transformers_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
