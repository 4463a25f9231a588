"""One prepared GPU check: compile, verify and time every nup kernel and the full step; one JSON out.

Run once on a CUDA machine, from the repository root, with nothing installed beyond torch, triton
and numpy::

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT [--phase correctness|timing] [--budget-s 270]
        [--section-limit-s 150] [--only a,b] [--skip c] [--tiny]

``--phase correctness`` runs the first six sections, ``--phase timing`` the ``timing_*`` ones; each
phase fits 5 minutes on one H200, compilation included (run them as two calls). torch, triton and
numpy are imported first (exit 2 with a message when one is missing). Every section runs in its own
process, stopped after ``--section-limit-s``: a sticky CUDA error or a hang costs that section only.
The code is in ``benchmarks/gpu/``: ``settings`` (names, tolerances, shapes), ``record`` (the JSON),
``helpers``, ``correctness``, ``step_checks``, ``timing_kernels``, ``timing_step``, ``runner``.

Sections, in order (``--only`` / ``--skip`` take these names):

- ``compile``: every kernel once at a tiny shape, with its first-call (compile) time.
- ``correctness_fp32`` / ``_tf32`` / ``_bf16``: every kernel against ``nup_kernels.reference``
  (computed in fp32 with TF32 off) at awkward and aligned shapes; tolerances in ``TOLERANCE``.
- ``fused_step``: NuMLP + NuP(fused=True) against the drop-in step over 5 steps (both update
  paths), and bitwise repeatability of two runs.
- ``host_sync``: ``torch.cuda.set_sync_debug_mode("error")`` around ``opt.step()`` (drop-in) and
  around ``backward(); opt.step()`` (fused).
- ``timing_memory``, ``timing_step``, ``timing_step_compiled``, ``timing_linear``,
  ``timing_step_bf16``: CUDA-event medians against the baselines (``settings.step_variants``),
  with DESIGN.md's targets as pass/fail booleans. No section and no timing item starts once
  ``--budget-s`` seconds have passed; it is listed under ``skipped`` instead.

The correctness sections pin the autotuned matmul kernels to one config (the smallest; the
largest too at an awkward shape under TF32 and bf16): autotuning builds all five configs (per dtype) of
every specialization, seconds to tens of seconds per kernel. The timing sections
autotune as in production and check those outputs as well.

``--tiny`` runs every section at tiny shapes with 1-2 repeats. Without CUDA it runs the kernels
in Triton's interpreter (``TRITON_INTERPRET=1``, ``NUP_BACKEND=triton``, set here when unset):
timings are then no performance figures (``timings_meaningful: false``, no verdicts), and the
TF32, bf16 and host-sync checks are skipped with a reason.

``$OUT/sections/<name>.json`` is rewritten atomically after every check and timing by the section's
process; ``$OUT/gpu_check.json`` merges them after every section. Exit status:
0 when every check passed and no section raised, 1 otherwise, 2 without CUDA and ``--tiny`` or
for an unknown section name.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu.correctness import check_linear  # noqa: E402
from gpu.record import Run  # noqa: E402
from gpu.runner import load_kernels, main  # noqa: E402
from gpu.settings import SECTIONS, TOLERANCE  # noqa: E402

__all__ = ["SECTIONS", "TOLERANCE", "Run", "check_linear", "load_kernels", "main"]

if __name__ == "__main__":
    sys.exit(main())
