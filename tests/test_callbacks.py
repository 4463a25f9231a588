"""Logging: NuP.log_dict, the Lightning and transformers callbacks, accelerate, nup train --tensorboard.

The framework tests skip cleanly where the optional framework is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nup
from nup.callbacks import collect, nup_optimizers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _trained_nup(steps: int = 3) -> tuple[nn.Module, nup.NuP]:
    model = _model()
    opt = nup.NuP(model.named_parameters(), lr=0.1, schedule=nup.make_schedule("geometry"))
    x, y = _data()
    for _ in range(steps):
        opt.lam_applied = float(opt.schedule.multiplier(4, "cpu").mean())  # λ of this step
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_log_dict_is_flat_floats_matching_the_stat_vectors():
    model, opt = _trained_nup()
    logs, v = opt.log_dict(), opt.stat_vectors()
    names = [n for n, _ in model.named_parameters()]
    assert all(type(value) is float for value in logs.values())
    assert len(logs) == 6 * len(names) + 3
    for i, name in enumerate(names):
        assert logs[f"nup/cos/{name}"] == pytest.approx(float(v["cos"][i]))
        assert logs[f"nup/lr/{name}"] == pytest.approx(float(v["lr"][i]))
        assert logs[f"nup/c_norm/{name}"] == pytest.approx(float(v["c_norm"][i]))
    assert logs["nup/step"] == 3.0
    lam = float(opt.schedule.multiplier(len(names), "cpu").mean())
    assert logs["nup/multiplier"] == pytest.approx(lam)  # λ now, for the next step
    assert opt.lam_applied != 1.0
    assert logs["nup/lr/0.weight"] == pytest.approx(0.1 * opt.lam_applied)  # the rate applied, not group['lr']


def test_collect_unwraps_and_numbers_several_optimizers():
    _, a = _trained_nup()
    _, b = _trained_nup()

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert nup_optimizers([Wrapper(a), torch.optim.SGD(_model().parameters(), lr=0.1), b]) == [a, b]
    logs = collect([Wrapper(a), b])
    assert "nup/cos/0.weight" in logs and "nup1/cos/0.weight" in logs


def test_unnamed_tensors_are_logged_under_their_model_names():
    model = _model()
    opt = nup.NuP(model.parameters(), lr=0.1)  # as frameworks build it: no names
    _backward_step(model, opt)
    assert "nup/cos/param0" in collect(opt)
    logs = collect(opt, model=model)
    assert "nup/cos/0.weight" in logs and "nup/lr/2.bias" in logs and not any("param" in k for k in logs)


def _backward_step(model, opt):
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_lightning_callback_logs_the_effective_lr(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from nup.callbacks import NuPLightningCallback

    class Capture(pl.loggers.Logger):
        name, version = "capture", 0
        rows: list = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = _lightning_module(pl)
    trainer = pl.Trainer(max_steps=8, logger=Capture(), callbacks=[NuPLightningCallback(every=2)],
                         log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, loader)
    rows = [(step, m) for step, m in Capture.rows if "nup/multiplier" in m]
    assert [step for step, _ in rows] == [2, 4, 6, 8]
    opt = nup_optimizers(trainer.optimizers)[0]
    last = rows[-1][1]
    lam = float(opt.schedule.multiplier(4, "cpu").mean())
    assert lam != 1.0 and last["nup/multiplier"] == pytest.approx(lam)
    applied = float(opt.stat_vectors()["lr"][0])
    assert applied != 0.1 and last["nup/lr/net.0.weight"] == pytest.approx(applied)
    assert {f"nup/{k}/net.2.weight" for k in ("cos", "update_norm", "c_norm")} <= set(last)


def _lightning_module(pl):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return nup.NuP(self.named_parameters(), lr=0.1, schedule=nup.make_schedule("geometry"))

    return Module()


def test_lightning_resume_is_bit_exact(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    x, y = _data()
    # one batch per epoch: every step sees the same data, whatever Lightning's loop does at a restart
    # (resumed at an epoch's end, it replays the first batch of the next epoch one step early)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    def trainer(steps):
        return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)

    whole = _lightning_module(pl)
    trainer(8).fit(whole, loader)
    first = trainer(4)
    first.fit(_lightning_module(pl), loader)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _lightning_module(pl)
    trainer(8).fit(resumed, loader, ckpt_path=tmp_path / "half.ckpt")
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class HFModel(nn.Module):
    """What transformers.Trainer trains: ``forward(**batch)`` returns the loss."""

    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_transformers_trainer_logs_nup_statistics(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from nup.callbacks import add_to_trainer

    x, y = _data()
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]
    model = HFModel()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, logging_steps=2, report_to=[],
                                          use_cpu=True, per_device_train_batch_size=16, save_strategy="no",
                                          disable_tqdm=True)
    opt = nup.NuP(model.parameters(), lr=0.1, schedule=nup.make_schedule("geometry"))  # unnamed, as HF users do
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    add_to_trainer(trainer)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "nup/multiplier" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]
    assert "nup/lr/net.0.weight" in logged[0]
    assert all(f"nup/cos/net.{i}.weight" in row for row in logged for i in (0, 2))
    # HF's learning_rate is group['lr'] (after its scheduler); nup/lr is the rate applied, with λ
    applied = float(opt.stat_vectors()["lr"][0])
    assert logged[-1]["nup/lr/net.0.weight"] == pytest.approx(applied)
    assert logged[-1]["nup/multiplier"] != 1.0


def test_accelerate_prepared_optimizer_trains_and_resumes(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    model = _model()
    opt = nup.NuP(model.named_parameters(), lr=0.1, schedule=nup.make_schedule("geometry"))
    model, popt = acc.prepare(model, opt)
    x, y = _data()

    def step():
        popt.zero_grad()
        acc.backward(nn.functional.cross_entropy(model(x), y))
        popt.step()

    for _ in range(3):
        step()
    assert collect(popt)["nup/step"] == 3.0
    acc.save_state(str(tmp_path / "state"))
    for _ in range(2):
        step()
    after = [p.detach().clone() for p in model.parameters()]
    acc.load_state(str(tmp_path / "state"))
    for _ in range(2):
        step()
    for p, q in zip(model.parameters(), after):
        assert torch.equal(p, q)  # resumed bit for bit


def test_nup_train_tensorboard_logs_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nup.train import TrainConfig, run_training

    summary = run_training(TrainConfig(data="teacher", depth=2, m=4, steps=6, batch_size=32, eval_every=3),
                           tmp_path, progress=False, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr_mult", "test/loss", "test/acc"} <= tags
    assert {f"nup/{k}/{n}" for k in ("cos", "lr", "update_norm", "c_norm") for n in summary["names"]} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))
    assert [e.step for e in events.Scalars("test/acc")] == [2, 5]


def test_transformers_optimizer_cls_and_kwargs_keeps_weight_decay(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = _data()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                                          per_device_train_batch_size=16, save_strategy="no", disable_tqdm=True,
                                          weight_decay=0.1)
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]
    trainer = transformers.Trainer(model=HFModel(), args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=(nup.NuP, {"lr": 0.1}))
    trainer.train()
    opt = nup_optimizers(trainer.optimizer)[0]
    # HF's AdamW-style groups arrive: decay on the matrices, none on the biases
    assert sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups) == [(0.0, 2), (0.1, 2)]
