"""Accelerated paths with the reference's signatures and edge-case policy.

- :mod:`iem_ref.accel.cpu`: Numba ``@njit`` fused one-pass kernels (online
  softmin, M1-M2) and their backward (G4);
- :mod:`iem_ref.accel.cuda`: Numba CUDA kernels.

Importing :mod:`iem_ref.accel` imports nothing heavy; Numba is imported by the
submodules only (``import iem_ref.accel.cpu``).
"""

__all__ = ["cpu", "cuda"]
