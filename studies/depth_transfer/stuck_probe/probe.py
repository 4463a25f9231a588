"""Which layers' steps leave depth-32 harmonic runs on the plateau? A one-off probe beside the depth-transfer study.

νP + harmonic (k0 = 3, ReLU), teacher task, depth 32, lr 0.5 decayed by a cosine over 300 steps, batch 64:
the study's setting where 2 of 3 seeds stay above half of chance. Each condition multiplies one group's lr
(input layer, hidden block, readout) by a factor, or spreads the hidden block's move evenly over its layers
(each hidden layer's lr times (T_hidden/(L − 2))/ρ_k, the same total); 6 seeds each. Prints one line per
condition: the runs left above half of chance and their metrics (mean loss over steps 240–300).

Run: ``python studies/depth_transfer/stuck_probe/probe.py > studies/depth_transfer/stuck_probe/probe.txt``
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup.data import batches
from nup.schedule import WarmupCosineSchedule
from nup.studies.depth_transfer.config import Config, variant_config, window_mean
from nup.studies.depth_transfer.runs import chance_loss, load_task

DEPTH, LR, STEPS, SEEDS = 32, 0.5, 300, 6
CONDITIONS = {"as in the study": {}, "hidden lr × 0.5": {"hidden": 0.5}, "hidden lr × 0.25": {"hidden": 0.25},
              "input lr × 0.25": {"input": 0.25},
              "readout lr × 0.25": {"readout": 0.25}, "hidden move spread evenly": {"spread": 1.0}}


def run(condition: str, seed: int) -> float:
    """The metric of one run: the mean minibatch loss over the last 20% of the steps."""
    torch.set_num_threads(1)
    factors = CONDITIONS[condition]
    cfg = Config()
    x, y = load_task(cfg, "teacher")
    m, kwargs = variant_config(cfg, "nup_harmonic")
    torch.manual_seed(seed)
    model = NuMLP(x.shape[1], int(y.max()) + 1, DEPTH, m, **kwargs)
    rho, layers = model.layout.rho, list(model.layers)
    even = sum(rho[1:]) / (DEPTH - 2)
    hidden = [factors.get("hidden", 1.0) * (even / rho[k] if "spread" in factors else 1.0) for k in range(1, DEPTH - 1)]
    groups = [{"params": [layers[0].weight], "lr": LR * factors.get("input", 1.0)},
              *({"params": [layer.weight], "lr": LR * f} for layer, f in zip(layers[1:-1], hidden)),
              {"params": [layers[-1].weight], "lr": LR * factors.get("readout", 1.0)}]
    opt = NuP(groups, lr=LR, schedule=WarmupCosineSchedule(STEPS))
    stream = batches(x, y, cfg.batch_size, torch.Generator().manual_seed(seed))
    trace = []
    for _ in range(STEPS):
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.append(loss.item())
    return window_mean(np.array(trace), STEPS)


def main() -> None:
    half = chance_loss(load_task(Config(), "teacher")[1]) / 2
    jobs = [(c, s) for c in CONDITIONS for s in range(SEEDS)]
    with ProcessPoolExecutor(2) as pool:
        metrics = dict(zip(jobs, pool.map(run, *zip(*jobs))))
    print(f"teacher, nup_harmonic, depth {DEPTH}, lr {LR}, {STEPS} steps, {SEEDS} seeds; half of chance {half:.3f}")
    for c in CONDITIONS:
        values = [metrics[c, s] for s in range(SEEDS)]
        print(f"{c}: {sum(v > half for v in values)} of {SEEDS} above half of chance; "
              f"metrics {', '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
