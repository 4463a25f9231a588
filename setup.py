from setuptools import find_packages, setup

setup(
    name="nup",
    version="0.1.0",
    description="νP: deep MLPs at the Edge of Chaos with fused Triton kernels for update geometry",
    packages=find_packages(include=["nup", "nup.*", "nup_kernels", "nup_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "matplotlib",
        "tqdm",
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "data": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["nup = nup.cli:main"]},
)
