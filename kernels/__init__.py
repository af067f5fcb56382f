"""Triton device code (``@triton.jit`` kernels), installed as ``fastcaps.kernels``.

One module per operation. Host launchers and autograd Functions live in ``fastcaps`` and import
from here; nothing in this package is public API. The kernels land with the Triton issue; until
then ``backend="triton"`` raises ``NotImplementedError``.
"""
