"""Chooses between the Triton kernels and the plain-PyTorch paths.

`MEDCARE_KERNELS=auto` (default) uses Triton for CUDA tensors and PyTorch
otherwise; `triton` forces the kernels (on CPU only meaningful together with
TRITON_INTERPRET=1, for tests); `torch` forces the PyTorch path everywhere.
"""

import os

_CHOICES = ("auto", "triton", "torch")


def kernel_backend() -> str:
    choice = os.environ.get("MEDCARE_KERNELS", "auto").strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"MEDCARE_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def use_triton(*tensors) -> bool:
    """True when the Triton path should run for these tensors."""
    backend = kernel_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return all(t.is_cuda for t in tensors if t is not None)
