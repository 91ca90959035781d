"""Fused kernels of medcare-dist, each with its plain-PyTorch reference path."""

from .dispatch import kernel_backend, use_triton
from .mixture_lora import fused_mixture_lora, mixture_lora_torch, route_top_k
from .projection import orthonormal_basis, project_out_knowledge, project_out_torch

__all__ = [
    "fused_mixture_lora", "mixture_lora_torch", "route_top_k",
    "project_out_knowledge", "project_out_torch", "orthonormal_basis",
    "kernel_backend", "use_triton",
]
