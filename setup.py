"""Packaging for caad: Contrastive Audio-Aware Distillation kernels and trainer."""

from setuptools import find_packages, setup

setup(
    name="caad",
    version="0.1.0",
    description="Fused contrastive knowledge-distillation kernels (Triton, C++/CUDA) for speech language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["caad_kernels", "caad_kernels.*", "caad", "caad.*"]),
    install_requires=[
        "torch>=2.6",
        # Triton wheels exist for Linux x86-64 only; elsewhere the torch backend serves.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "ruff"],
        "train": ["transformers>=4.45", "accelerate>=1.0"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "peers": ["liger-kernel", "trl"],
    },
    license="Apache-2.0",
)
