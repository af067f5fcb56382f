"""Triton device code (``@triton.jit`` kernels), installed as ``fastcaps.kernels``.

One module per operation (``squash.py`` so far). Host launchers and autograd Functions live in
``fastcaps`` (``fastcaps.triton_squash``) and import from here; nothing in this package is public
API. Ops without a kernel yet raise ``NotImplementedError`` for ``backend="triton"``.
"""
