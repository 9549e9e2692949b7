"""Test set-up: Triton kernels run on CPU through the interpreter where there is no GPU.

TRITON_INTERPRET must be set before anything imports triton, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
