"""One TF32 policy for every kernel, robust to torch's new ``fp32_precision`` API."""

import subprocess
import sys
import textwrap
from pathlib import Path

from nup_kernels import gram_norm
from nup_kernels.backend import fp32_dot_precision

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "NUP_BACKEND": "triton", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_legacy_setting_is_followed():
    assert gram_norm.dot_precision is fp32_dot_precision
    code = """
        import torch
        from nup_kernels.backend import fp32_dot_precision
        out = [fp32_dot_precision()]
        torch.set_float32_matmul_precision("high"); out.append(fp32_dot_precision())
        torch.set_float32_matmul_precision("highest"); out.append(fp32_dot_precision())
        print(out)
    """
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['ieee', 'tf32', 'ieee']"


def test_new_api_is_followed_and_kernels_still_launch():
    # regression: once fp32_precision was set, reading allow_tf32 raised and every linear_act launch failed
    code = """
        import torch
        from nup_kernels.backend import fp32_dot_precision
        from nup_kernels.linear_act import linear_act_forward
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        a = fp32_dot_precision()
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        b = fp32_dot_precision()
        y, _ = linear_act_forward(torch.randn(3, 5), torch.randn(4, 5), None, 1.0, 1.0, "relu")
        print(a, b, tuple(y.shape))
    """
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "tf32 ieee (3, 4)"
