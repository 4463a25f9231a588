"""nup_kernels: Triton kernels for νP's update geometry, their PyTorch reference, and the traffic model.

Imports nothing from ``nup``. Triton is optional: without it every op runs its reference path.
"""

from nup_kernels import traffic

__all__ = ["traffic"]
