"""Settings of the GPU check: section names and phases, tolerances, targets, shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SECTIONS = (
    "compile",
    "correctness_fp32",
    "correctness_tf32",
    "correctness_bf16",
    "fused_step",
    "host_sync",
    "timing_memory",
    "timing_step",
    "timing_step_compiled",
    "timing_linear",
    "timing_step_bf16",
)
#: ``--phase``: each phase runs within 5 minutes on one H200, compilation included
PHASES = {
    "correctness": SECTIONS[:6],
    "timing": SECTIONS[6:],
}
BUDGET_S = 270.0  # default --budget-s on CUDA
SECTION_LIMIT_S = 150.0  # default time limit of one section process on CUDA
SECTION_GRACE_S = 30.0  # a section started before the budget ran out may run this long past it
#: relative RMS error ``‖out − ref‖ / ‖ref‖`` allowed against the reference in fp32 with TF32 off
TOLERANCE = {"fp32": 2e-5, "tf32": 5e-3, "bf16": 2e-2}
#: fused step against the drop-in step after 5 steps (displacements ``P − P_0``, statistics)
STEP_TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3}
#: precision -> (dtype, ``torch.set_float32_matmul_precision`` level)
PRECISIONS = {
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
}
#: DESIGN.md's performance targets: (comparison, bound) on the entry's ``ratio``
TARGETS = {
    "fused_vs_plain": ("<=", 1.05),  # fused step ms / plain step ms
    "fused_vs_unfused": (">=", 1.5),  # unfused step ms / fused step ms
    "fused_vs_compiled": (">", 1.0),  # compiled step ms / fused step ms
    "apply_vs_copy": (">=", 0.8),  # achieved GB/s / device copy GB/s
    "linear_vs_cublas": (">=", 0.9),  # kernel TFLOP/s / F.linear (cuBLAS) TFLOP/s
}
STEP_VARIANTS = ("plain", "unfused", "drop_in", "fused")
STEP_VARIANT_DOCS = {
    "plain": "F.linear + ReLU (alpha folded into W), autograd, torch.optim.SGD(fused=True); no statistics",
    "unfused": "the plain forward/backward, then unfused_stats_update: per tensor g.norm(), (g*c).sum(), "
    "c.norm(), p.addcmul_, c.addcmul_",
    "compiled": "the plain forward/backward (eager), then torch.compile(unfused_stats_update)",
    "drop_in": "NuMLP + NuP(fused=False, geometry schedule): Triton linear_act and multi-tensor kernels",
    "fused": "NuMLP + NuP(fused=True, geometry schedule): updates applied inside the backward",
}
LINEAR_KERNELS = ("_linear_act_fwd_kernel", "_linear_act_bwd_dx_kernel", "_linear_act_bwd_dw_kernel")
STAT_KEYS = ("update_norm", "cos", "c_norm", "coherence", "lr", "multiplier", "skipped")


@dataclass(frozen=True)
class Sizes:
    """Shapes and repeat counts; ``(B, n_in, n_out)`` for linear layers."""

    check_shapes: tuple[tuple[int, int, int], ...]  # awkward first, then B = 1, then aligned
    act_shape: tuple[int, int, int]
    mt_shapes: tuple[tuple[int, ...], ...]
    step_check: tuple[int, int, int, int, int]  # in, out, depth, m, batch
    copy_numel: int
    apply_shape: tuple[int, int]  # (n_out, n_in)
    apply_batch: dict[str, int]
    mt_bench: tuple[int, tuple[int, int]]  # count, shape
    elem_shape: tuple[int, int]
    linear_shapes: tuple[tuple[int, int, int], ...]
    gram_shapes: tuple[tuple[int, int, int], ...]
    step_io: tuple[int, int]
    step_m: int
    step_max_width: int
    depths: tuple[int, ...]
    batches: tuple[int, ...]
    bf16_depths: tuple[int, ...]
    warmup: int
    max_reps: int
    min_time_s: float  # time each measurement at least this long (within max_reps)


GPU_SIZES = Sizes(
    check_shapes=((300, 1000, 333), (1, 17, 33), (4096, 1024, 4096)),
    act_shape=(33, 100, 70),
    mt_shapes=((1,), (17,), (33, 17), (1000, 33), (4096,), (1024, 4096)),
    step_check=(33, 10, 4, 17, 33),
    copy_numel=1 << 28,
    apply_shape=(8192, 8192),
    apply_batch={"fp32": 32, "bf16": 128},
    mt_bench=(16, (4096, 4096)),
    elem_shape=(8192, 8192),
    linear_shapes=((4096, 4096, 4096), (8192, 8192, 8192)),
    gram_shapes=((32, 8192, 8192), (256, 8192, 8192)),
    step_io=(512, 16),
    step_m=512,
    step_max_width=2048,
    depths=(4, 16, 64),
    batches=(32, 256, 2048),
    bf16_depths=(16,),
    warmup=2,
    max_reps=20,
    min_time_s=0.2,
)
TINY_SIZES = Sizes(
    check_shapes=((33, 40, 20), (1, 17, 33), (64, 32, 48)),
    act_shape=(9, 20, 12),
    mt_shapes=((1,), (17,), (33, 17), (5000,)),
    step_check=(7, 3, 3, 2, 17),
    copy_numel=1 << 16,
    apply_shape=(48, 40),
    apply_batch={"fp32": 4, "bf16": 4},
    mt_bench=(3, (40, 33)),
    elem_shape=(40, 48),
    linear_shapes=((32, 48, 40),),
    gram_shapes=((8, 48, 40),),
    step_io=(16, 8),
    step_m=4,
    step_max_width=32,
    depths=(2, 3),
    batches=(4, 72),
    bf16_depths=(2,),
    warmup=0,
    max_reps=2,
    min_time_s=0.0,
)
