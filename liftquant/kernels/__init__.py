"""Kernel backends for packed LiftQuant layers (``registry``) and the lattice-search kernel
(``search``). Importing this package imports neither Triton nor BitBLAS."""

from liftquant.kernels.registry import KernelCache, backend_names, get_backend, set_backend

__all__ = ["KernelCache", "backend_names", "get_backend", "set_backend"]
