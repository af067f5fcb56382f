"""Triton device code (``@triton.jit`` kernels), installed as ``fastcaps.kernels``.

One module per operation: ``squash``, ``predictions``, ``routing``. Host launchers and the
``torch.library`` ops live in ``fastcaps.triton_*`` and import from here; nothing in this package
is public API.
"""
