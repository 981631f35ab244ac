"""Without a GPU, Triton kernels run in the Triton interpreter on CPU tensors.

Set before anything imports triton: `triton.jit` reads TRITON_INTERPRET when a kernel is defined.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
