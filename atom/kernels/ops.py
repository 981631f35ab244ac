"""The one place where a device picks its kernels: Triton on CUDA, the torch reference elsewhere.

Layers call these functions; each looks at its input's device, so a model built on the CPU runs the
references and the same model on a GPU runs the Triton kernels, with no flag threaded through.
"""

from __future__ import annotations
