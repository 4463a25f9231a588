import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("nup").joinpath("__init__.py").read_text(),
                    re.M).group(1)

setup(
    name="nup",
    version=VERSION,
    description="νP: deep MLPs at the Edge of Chaos with fused Triton kernels for update geometry",
    license="MIT",
    license_files=["LICENSE"],
    packages=find_packages(include=["nup", "nup.*", "nup_kernels", "nup_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "matplotlib",
        "tqdm",
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        # the kernels; without triton every op runs its PyTorch reference path (CUDA builds of torch bring it)
        "triton": ["triton>=3.6"],
        # the tests run every kernel through Triton's interpreter, so they need it
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "triton>=3.6"],
        "data": ["scikit-learn"],
        # optional integrations: nup.callbacks (Lightning, transformers), nup train --tensorboard, accelerate tests
        "frameworks": ["lightning", "accelerate", "transformers", "tensorboard"],
    },
    entry_points={"console_scripts": ["nup = nup.cli:main"]},
)
