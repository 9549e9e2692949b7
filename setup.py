"""Packaging for caad: Contrastive Audio-Aware Distillation kernels and trainer.

The C++/CUDA kernels in csrc/ are shipped as sources (copied into caad_kernels/_csrc)
and JIT-built on first use. ``CAAD_BUILD_EXT=1 pip install --no-build-isolation .``
builds them ahead of time instead (needs torch, setuptools>=68 and wheel installed first;
CUDA sources are included when torch has CUDA and nvcc is found).
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Also installs csrc/ as caad_kernels/_csrc, so the JIT build works from a wheel."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "caad_kernels" / "_csrc"
        shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tests"))


def native_extensions():
    if os.environ.get("CAAD_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # The JIT build's sources and flags (caad_kernels/jit.py, loaded alone: it needs only torch), so the two
    # builds cannot drift apart; CAAD_CPU_ARCH=x86-64-v3 etc. replaces -march=native for portable wheels.
    spec = importlib.util.spec_from_file_location("caad_jit", ROOT / "caad_kernels" / "jit.py")
    jit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jit)
    sources = ["csrc/aot_module.cpp"] + [f"csrc/{f}" for f in jit.CPU_SOURCES]
    arch = f"-march={os.environ.get('CAAD_CPU_ARCH', 'native')}"
    cxx = [arch if f == "-march=native" else f for f in jit.cpu_flags()]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += [f"csrc/{f}" for f in jit.CUDA_SOURCES]
        ext = CUDAExtension(
            "caad_kernels._C", sources, include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={
                "cxx": cxx + ["-DCAAD_WITH_CUDA"],
                "nvcc": jit.cuda_flags() + ["-DCAAD_WITH_CUDA", "-gencode", "arch=compute_80,code=sm_80",
                                            "-gencode", "arch=compute_90a,code=sm_90a"],
            },
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("caad_kernels._C", sources, include_dirs=[str(ROOT / "csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, ext_cmdclass = native_extensions()

setup(
    name="caad",
    version="0.1.0",
    description="Fused contrastive knowledge-distillation kernels (Triton, C++/CUDA) for speech language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["caad_kernels", "caad_kernels.*", "caad", "caad.*"]),
    install_requires=[
        "torch>=2.6",
        # Triton wheels exist for Linux x86-64 only; elsewhere the torch and cpu backends serve.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "ninja",  # the JIT build of csrc/ on first use
    ],
    extras_require={
        # matplotlib: the report test; setuptools/wheel: the ahead-of-time build test (--no-build-isolation);
        # mistral-common: the real VoxtralProcessor's Tekken tokenizer (pure Python + tiktoken, no torch; its audio
        # extra is soundfile and soxr, which the train extra has too).
        "test": ["pytest>=8", "pytest-benchmark>=4", "ruff", "matplotlib", "setuptools>=68", "wheel",
                 "mistral-common[audio]>=1.13"],
        # The method layer (caad/): HF Trainer, audio files and resampling, HF datasets.
        # peft: LoRA students (caad train --lora-r); matplotlib: the demo's and `caad bias-eval --plot`'s PNG.
        "train": ["transformers>=5.0", "accelerate>=1.0", "soundfile", "soxr", "datasets", "peft>=0.13",
                  "matplotlib"],
        # Voxtral checkpoints: their processor's Tekken tokenizer (MistralCommonBackend).
        "voxtral": ["mistral-common[audio]>=1.13"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "peers": ["liger-kernel", "trl"],
    },
    entry_points={"console_scripts": ["caad=caad.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass},
    license="Apache-2.0",
)
