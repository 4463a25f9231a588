"""Diagnostics for studies (SPEC §5): sharpness, the NTK's top eigenvalue, how the readout sees its inputs,
each layer's minibatch step efficiency, and the coordinate check.

Conventions.
- ``loss_fn(model, batch) -> 0-dim Tensor``; for the coordinate check ``batch = (x, y)``.
- MSE is ``L = (1/2n)·Σ_i ‖f(x_i) − y_i‖²`` (:func:`mse_loss`), the catapult convention.
- The NTK is ``Θ = J Jᵀ``, where ``J`` (shape ``(n·k, P)``) stacks ``∂f_c(x_i)/∂θ`` for every
  sample ``i`` and output ``c``, over the trainable parameters. Its normalised top eigenvalue is
  ``λ_0 = λ_max(Θ)/n``. Derivation: ``∇²L = JᵀJ/n + (1/n)·Σ_{i,c} (f_c(x_i) − y_ic)·∇²f_c(x_i)``;
  the first term (Gauss–Newton) has the non-zero spectrum of ``JJᵀ/n``. For a model linear in
  its parameters the second term vanishes, GD is ``δθ ← (I − η·JᵀJ/n)·δθ``, and it is stable iff
  ``η < 2/λ_0``: the lazy/catapult boundary of SPEC §5. With ``k > 1`` outputs the full
  ``(n·k) × (n·k)`` kernel is the right one; the ``n × n`` kernel summed over outputs
  overestimates ``λ_0`` (by ``k`` for ``f(x) = Wx``).
- Hessian-vector products need a twice-differentiable backward and raise otherwise (NuMLP's
  layers are ``@once_differentiable``). The NTK needs first order only (``J u`` falls back to
  central differences of the outputs).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[nn.Module, object], Tensor]
MatVec = Callable[[Tensor], Tensor]


def mse_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``(1/2n)·Σ_i ‖f(x_i) − y_i‖²`` for ``batch = (x, y)``, x: (n, n_0), y: (n, k) or (n,)."""
    x, y = batch
    out = model(x)
    return 0.5 * (out - y.reshape(out.shape)).pow(2).sum() / x.shape[0]


def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def _unflat(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


JVP_MODES = ("auto", "autograd", "fd")
FD_STEP = 1e-4
"""Central-difference step for ``J u``, relative to ‖θ‖. Measured on fp32 NuMLPs, the resulting
λ_0 is off by ~1e-5 (tanh) and up to ~1e-2 (ReLU, whose kinks the step crosses)."""


def _once_differentiable(tensors: Sequence[Tensor | None]) -> bool:
    """True when the graph behind ``tensors`` has a node that refuses a second derivative.

    ``@once_differentiable`` backwards (NuMLP's layers) wrap their outputs in ``Error`` nodes, and
    a double backward through them returns no gradient instead of raising.
    """
    stack = [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().endswith("Error"):
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _hvp_operator(
    model: nn.Module, loss_fn: LossFn, batch: object
) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Tensor]]]:
    """One forward and first backward, kept as a graph; returns the trainable parameters and ``v ↦ H v``.

    Only ``torch.autograd.grad`` is used, so no parameter's ``.grad`` is read or written.
    """
    params = [p for _, p in _trainable(model)]
    grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True, allow_unused=True)
    if _once_differentiable(grads):
        raise RuntimeError(
            "the loss's backward is not twice differentiable (an @once_differentiable autograd Function, "
            "e.g. NuMLP's fused layers), so Hessian-vector products would silently be wrong; run the model "
            "through a twice-differentiable path"
        )
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(vector: Sequence[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        if live:
            hv = torch.autograd.grad(
                [grads[i] for i in live], params, grad_outputs=[vector[i] for i in live],
                retain_graph=True, allow_unused=True,
            )
            out = [o if h is None else h.detach() for o, h in zip(out, hv, strict=True)]
        return out

    return params, hvp


def hessian_vector_product(
    model: nn.Module, loss_fn: LossFn, batch: object, vector: list[Tensor]
) -> list[Tensor]:
    """``H v`` for the Hessian of ``loss_fn(model, batch)`` over the trainable parameters.

    ``vector`` holds one tensor per trainable parameter (same shapes, in ``named_parameters``
    order); the result has the same layout. Double backward; ``.grad`` is left untouched. Raises
    RuntimeError when the backward is ``@once_differentiable`` (finite differences of gradients
    are not offered: across ReLU kinks they are wrong by O(1)).
    """
    params, hvp = _hvp_operator(model, loss_fn, batch)
    if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params, strict=False)):
        raise ValueError("vector must hold one tensor per trainable parameter, with its shape")
    return hvp(vector)


def _central_difference(
    fn: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor], direction: Sequence[Tensor]
) -> Tensor:
    """``(fn(θ + εd) − fn(θ − εd))/(2ε)``, ``ε = FD_STEP·max(‖θ‖, 1)/‖d‖``; ``fn`` gets new tensors."""
    d_norm = float(_flat(direction).norm())
    theta = max(float(_flat([p.detach() for p in params]).norm()), 1.0)
    eps = FD_STEP * theta / d_norm if d_norm > 0 else 1.0
    shifted = lambda sign: [p.detach() + (sign * eps) * d.to(p.dtype) for p, d in zip(params, direction, strict=True)]
    return (fn(shifted(1.0)) - fn(shifted(-1.0))) / (2 * eps)


def _start_vector(dim: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randn(dim, generator=gen, dtype=torch.float64).to(device)


def _lanczos_top(matvec: MatVec, v0: Tensor, iters: int, tol: float) -> float:
    """Largest algebraic eigenvalue of a symmetric operator by Lanczos (full reorthogonalisation).

    ``matvec`` maps a float64 vector to a float64 vector. Stops when the top Ritz pair's residual
    ``β_j·|s_j|`` (a bound on its eigenvalue error) is at most ``tol·|θ|``, or after ``iters``
    products.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    basis = [v0 / v0.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    theta = float("nan")
    for j in range(iters):
        w = matvec(basis[j])
        alphas.append(float(w @ basis[j]))
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta = float(evals[-1])
        residual = beta * abs(float(evecs[-1, -1]))
        scale = max(abs(a) for a in alphas + betas + [theta])
        if residual <= tol * abs(theta) or beta <= 1e-12 * scale or j + 1 == w.numel():
            break
        betas.append(beta)
        basis.append(w / beta)
    return theta


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: object,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """Top (largest algebraic) eigenvalue of the Hessian of ``loss_fn(model, batch)``.

    Lanczos on Hessian-vector products (:func:`hessian_vector_product`) over the trainable
    parameters: at most ``iters`` products, relative residual ``tol``. The start vector is drawn
    from ``generator`` (default: a fresh one seeded 0, so the global RNG is untouched).
    Parameters and ``.grad`` are left as they were. Units: loss per parameter².
    """
    params, hvp = _hvp_operator(model, loss_fn, batch)
    dim = sum(p.numel() for p in params)
    matvec = lambda v: _flat(hvp(_unflat(v, params)))
    return _lanczos_top(matvec, _start_vector(dim, generator, params[0].device), iters, tol)


def ntk_top_eigenvalue(
    model: nn.Module,
    x: Tensor,
    iters: int = 30,
    tol: float = 1e-5,
    method: str = "auto",
    max_jacobian_entries: int = 2**22,
    generator: torch.Generator | None = None,
    jvp: str = "auto",
) -> float:
    """``λ_0 = λ_max(J Jᵀ)/n``: the top eigenvalue of the empirical NTK over ``x`` (n, n_0), per sample.

    ``J`` is the ``(n·k, P)`` Jacobian of the ``k`` outputs at every sample w.r.t. the trainable
    parameters (module docstring: GD on ``(1/2n)·Σ‖f − y‖²`` is lazy for ``η < 2/λ_0``).
    ``method``: ``"full"`` builds ``J`` (one single-sample forward and ``k`` backwards per
    sample; first order only) and the smaller of the Gram matrices ``JJᵀ``/``JᵀJ``;
    ``"matfree"`` runs Lanczos on ``v ↦ J(Jᵀv)/n`` (``iters``, ``tol``, ``generator`` as in
    :func:`sharpness`), ``Jᵀv`` by backward and ``Ju`` by ``jvp``: ``"autograd"`` (double
    backward, exact), ``"fd"`` (central differences of the outputs, through any backward; see
    :data:`FD_STEP` for its accuracy), ``"auto"`` (autograd, or ``"fd"`` with a warning when the
    backward is ``@once_differentiable``, as NuMLP's is). ``method="auto"`` picks ``"full"``
    (exact, first order only) when ``n·k·P <= max_jacobian_entries``.
    """
    named = _trainable(model)
    params = [p for _, p in named]
    n = x.shape[0]
    out = model(x).reshape(n, -1)
    k, n_params = out.shape[1], sum(p.numel() for p in params)
    if method == "auto":
        method = "full" if n * k * n_params <= max_jacobian_entries else "matfree"
    if method == "full":
        del out
        rows = []
        for i in range(n):
            fi = model(x[i : i + 1]).reshape(-1)
            for c in range(k):
                grads = torch.autograd.grad(
                    fi[c], params, retain_graph=c + 1 < k, allow_unused=True, materialize_grads=True
                )
                rows.append(_flat(grads))
        j = torch.stack(rows)
        gram = j @ j.T if j.shape[0] <= j.shape[1] else j.T @ j
        return float(torch.linalg.eigvalsh(gram)[-1]) / n
    if method != "matfree":
        raise ValueError(f"method must be 'auto', 'full' or 'matfree', got {method!r}")
    if jvp not in JVP_MODES:
        raise ValueError(f"jvp must be one of {JVP_MODES}, got {jvp!r}")
    if jvp != "fd":
        dummy = torch.zeros_like(out, requires_grad=True)
        jt_dummy = torch.autograd.grad(out, params, grad_outputs=dummy, create_graph=True, allow_unused=True)
        if _once_differentiable(jt_dummy):
            if jvp == "autograd":
                raise RuntimeError("jvp='autograd' needs a twice-differentiable backward; use jvp='fd' or 'auto'")
            warnings.warn(
                "ntk_top_eigenvalue: the backward is @once_differentiable, so J·u is taken by central "
                "differences (relative error up to ~1e-2 for ReLU nets); method='full' is exact",
                stacklevel=2,
            )
            jvp = "fd"
    if jvp == "fd":
        def outputs(values: list[Tensor]) -> Tensor:
            with torch.no_grad():
                return functional_call(model, {m: v for (m, _), v in zip(named, values, strict=True)}, (x,))

        j_dot = lambda u: _central_difference(outputs, params, u)
    else:
        live = [i for i, g in enumerate(jt_dummy) if g is not None and g.requires_grad]
        if not live:
            raise ValueError("the model's output does not depend on its trainable parameters")
        live_jt = [jt_dummy[i] for i in live]
        j_dot = lambda u: torch.autograd.grad(live_jt, dummy, grad_outputs=[u[i] for i in live], retain_graph=True)[0]

    def matvec(v: Tensor) -> Tensor:
        ct = v.view(n, k).to(out.dtype)
        jt_v = torch.autograd.grad(out, params, grad_outputs=ct, retain_graph=True, materialize_grads=True)
        return j_dot(jt_v).reshape(-1).to(torch.float64) / n

    return _lanczos_top(matvec, _start_vector(n * k, generator, x.device), iters, tol)


# ----------------------------------------------------------------------------------------------
# How alike the inputs look to the readout


def pairwise_cosines(rows: Tensor) -> Tensor:
    """The cosines between every two different rows of ``rows`` ``(k, n)``, k ≥ 2: a float64 ``(k(k−1)/2,)``
    vector (upper triangle, row-major). A zero row has cosine 0 with every other."""
    if rows.dim() != 2 or rows.shape[0] < 2:
        raise ValueError(f"pairwise_cosines needs a (k, n) tensor with k >= 2 rows, got shape {tuple(rows.shape)}")
    r = rows.detach().to(torch.float64)
    unit = r / r.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    i, j = torch.triu_indices(r.shape[0], r.shape[0], offset=1, device=r.device)
    return (unit @ unit.t())[i, j]


def readout_features(model: nn.Module, x: Tensor) -> dict[str, float]:
    """How the readout sees the rows of ``x`` ``(k, n_0)``, k ≥ 2, through its inputs ``φ(h_{L−1})``.

    ``model`` is a :class:`~nup.NuMLP` (its ``preactivations`` and ``activation``). Returns ``"cos"``, the
    mean cosine between the readout inputs of different rows (1 when every input looks the same to the
    readout; compare :func:`nup.theory.feature_cosine_at_init`), and ``"inactive"``, the fraction of the
    readout's input units that are 0 on every row (units a ReLU has switched off for all these inputs; 0
    for an activation that is 0 at a single point only, such as leaky ReLU)."""
    with torch.no_grad():
        phi = model.activation(model.preactivations(x)[-2])
        return {"cos": float(pairwise_cosines(phi).mean()), "inactive": float((phi == 0).all(dim=0).double().mean())}


def step_efficiency(model: nn.Module, x: Tensor, y: Tensor,
                    loss: Callable[[Tensor, Tensor], Tensor] = torch.nn.functional.cross_entropy) -> list[float]:
    """``[e_1, …, e_{L−1}]`` measured: layer k's move under a normalized step along its own gradient on the
    batch ``(x, y)``, over the rank-one move ``η·ρ_k``, with every other layer held.

    ``e_k = ‖α_k·X_k·Gᵀ‖·√n_k/(‖G‖·‖h_k‖)`` for ``G = ∂loss(model(x), y)/∂W_k`` and ``X_k`` (B, n_{k−1}) the
    layer's inputs; 1 at batch size 1. ``model`` is a :class:`~nup.NuMLP`; nothing is changed. Predicted at
    init by :func:`nup.theory.batch_efficiency_at_init`.
    """
    layers = list(model.layers)[:-1]
    inputs, hs = layer_io(model, x)  # plain autograd ops: a fused optimizer's in-backward update is not triggered
    grads = torch.autograd.grad(loss(hs[-1], y), [layer.weight for layer in layers])
    with torch.no_grad():
        return [float((layer.alpha * (a @ g.t())).norm() * math.sqrt(g.shape[0]) / (g.norm() * h.norm()))
                for layer, a, g, h in zip(layers, inputs, grads, hs)]


def layer_io(model: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """``([x_0 … x_{L−1}], [h_1 … h_L])`` of a :class:`~nup.NuMLP`: every layer's input and pre-activation
    (``h_L`` is the output), through each layer's plain autograd ops (differentiable where grad is enabled)."""
    inputs, hs = [], []
    for layer in model.layers:
        inputs.append(x)
        hs.append(layer.preactivation(x))
        x = layer.activation(hs[-1])
    return inputs, hs


# ----------------------------------------------------------------------------------------------
# Coordinate check (mup's, across depth or width)


def _rms(t: Tensor) -> float:
    return float(t.detach().to(torch.float64).pow(2).mean().sqrt())


def _preactivations(model: nn.Module, x: Tensor) -> list[Tensor]:
    """``model.preactivations(x)`` if it exists, else the outputs of every ``nn.Linear`` in call order."""
    with torch.no_grad():
        if hasattr(model, "preactivations"):
            return [h.detach().clone() for h in model.preactivations(x)]
        seen: list[Tensor] = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
            for m in model.modules() if isinstance(m, nn.Linear)
        ]
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
    if not seen:
        raise ValueError("the model has no preactivations() method and no nn.Linear layer to hook")
    return seen


def coord_check(
    make_model: Callable[[int, int], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    depths: Sequence[int],
    steps: int = 3,
    seeds: Sequence[int] = (0,),
    axis: str = "depth",
) -> list[dict]:
    """mup-style coordinate check: preactivation RMS and its change since init, against size.

    For each size ``s`` in ``depths`` (depths, or widths when ``axis="width"``) and seed, the
    model is ``make_model(s, seed)`` (built under ``torch.manual_seed(seed)`` in a forked RNG),
    trained ``steps`` optimizer steps on the fixed batch ``(x, y)`` (``loss_fn(model, (x, y))``,
    backward, ``step``, ``zero_grad``). After ``t = 0 … steps`` steps, every layer's
    preactivation ``h_ℓ`` on ``x`` is recorded (``model.preactivations(x)``, else the outputs of
    the ``nn.Linear`` modules; the last one is the network output).

    Returns flat records ``{axis, size, depth, seed, t, layer, rel_layer, output, h_rms, dh_rms}``:
    ``depth`` is the number of recorded layers, ``layer`` is 1-based, ``rel_layer = layer/depth``,
    ``output`` marks the last layer, ``h_rms = RMS(h_ℓ)`` and ``dh_rms = RMS(h_ℓ − h_ℓ at t=0)``.
    """
    if axis not in ("depth", "width"):
        raise ValueError(f"axis must be 'depth' or 'width', got {axis!r}")
    records = []
    for size in depths:
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = make_model(size, seed)
                opt = make_optimizer(model)
                h0 = _preactivations(model, x)
                for t in range(steps + 1):
                    if t > 0:
                        loss = loss_fn(model, (x, y))
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    hs = h0 if t == 0 else _preactivations(model, x)
                    depth = len(hs)
                    for layer, (h, h_init) in enumerate(zip(hs, h0, strict=True), start=1):
                        records.append({
                            "axis": axis, "size": int(size), "depth": depth, "seed": int(seed), "t": t,
                            "layer": layer, "rel_layer": layer / depth, "output": layer == depth,
                            "h_rms": _rms(h), "dh_rms": _rms(h - h_init),
                        })
    return records


def _slope(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(size); NaN when a value is not positive."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v) & (v > 0)):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(sizes, dtype=np.float64)), np.log(v), 1)[0])


def coord_check_summary(records: list[dict]) -> dict:
    """Slopes of log RMS against log size, per step: 0 means flat, ``a`` means RMS ∝ size^a.

    For each ``t`` (values averaged over seeds): ``h_last``/``dh_last`` use the last hidden layer
    (the layer before the output); ``h_mean``/``dh_mean`` use the geometric mean over hidden
    layers. ``dh`` slopes at ``t = 0`` are NaN (no change yet). Returns
    ``{"axis", "sizes", "slopes": {t: {"h_last", "dh_last", "h_mean", "dh_mean"}}}``.
    """
    hidden = [r for r in records if not r["output"]]
    sizes = sorted({r["size"] for r in hidden})
    if len(sizes) < 2:
        raise ValueError("the summary needs hidden-layer records at two sizes or more")
    slopes = {}
    for t in sorted({r["t"] for r in hidden}):
        row = {}
        for key in ("h_rms", "dh_rms"):
            last, mean = [], []
            for s in sizes:
                rs = [r for r in hidden if r["t"] == t and r["size"] == s]
                top = max(r["layer"] for r in rs)
                last.append(float(np.mean([r[key] for r in rs if r["layer"] == top])))
                with np.errstate(divide="ignore"):
                    mean.append(float(np.exp(np.mean([np.log(r[key]) for r in rs]))))
            name = key.removesuffix("_rms")
            row[f"{name}_last"] = _slope(sizes, last)
            row[f"{name}_mean"] = _slope(sizes, mean)
        slopes[t] = row
    return {"axis": records[0]["axis"], "sizes": sizes, "slopes": slopes}


_POSITIONS = (("first hidden", 0.0), ("1/4", 0.25), ("1/2", 0.5), ("3/4", 0.75), ("last hidden", 1.0))


def _curves(records: list[dict], t: int, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Seed-averaged ``key`` against size at ``t``, one curve per relative layer position."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    sizes = sorted({r["size"] for r in records})
    for label, pos in (*_POSITIONS, ("output", None)):
        xs, ys = [], []
        for s in sizes:
            rs = [r for r in records if r["t"] == t and r["size"] == s]
            depth = rs[0]["depth"]
            if pos is None:
                layer = depth
            elif depth < 2:
                continue
            else:
                layer = 1 + round(pos * (depth - 2))
            xs.append(s)
            ys.append(float(np.mean([r[key] for r in rs if r["layer"] == layer])))
        out[label] = (xs, ys)
    return out


def plot_coord_check(records: list[dict], path: str | os.PathLike) -> None:
    """Write a PNG: a column per step ``t``, RMS(h) on top and RMS(h − h_0) below, log-log in size."""
    from matplotlib.figure import Figure

    ts = sorted({r["t"] for r in records})
    axis = records[0]["axis"]
    fig = Figure(figsize=(3.2 * len(ts), 6.0), layout="constrained")
    axes = fig.subplots(2, len(ts), squeeze=False)
    for col, t in enumerate(ts):
        for row, (key, title) in enumerate((("h_rms", "RMS(h)"), ("dh_rms", "RMS(h − h₀)"))):
            ax = axes[row][col]
            for label, (xs, ys) in _curves(records, t, key).items():
                pts = [(a, b) for a, b in zip(xs, ys, strict=True) if b > 0 and math.isfinite(b)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set_title(f"{title}, t={t}")
            if not ax.has_data():
                ax.text(0.5, 0.5, "nothing positive to plot", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
    axes[0][0].legend(fontsize="small")
    fig.savefig(path, dpi=120)
