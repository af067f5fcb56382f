"""Make Triton's interpreter (TRITON_INTERPRET=1) fast enough to run the kernels in CI.

The interpreter re-patches ``triton.language`` on every call of a ``@triton.jit`` helper, about
1.6 ms each; the routing kernels call a dozen helpers per input capsule, so the repeats were
most of the test suite's time. Inside a running kernel the language is already patched (the
launch patched it and restores it when the kernel ends), so the repeats are no-ops and can be
skipped. ``skip_repatching()`` does that; it changes nothing when the interpreter's internals
are not the ones it knows (the tests are then only slower).

``scalar_loop_bounds()`` is a compatibility fix, installed whenever fastcaps loads its kernels
under the interpreter: Triton 3.6's interpreter holds a kernel's scalars as 1-element arrays and
turns them into Python ints with ``int(array)``, which NumPy >= 2.4 refuses, so any loop whose
bounds come from ``tl.program_id`` (``for b in range(first, last)``) fails there. Newer Triton
squeezes the array first; the fix does the same. Compiled kernels are unaffected.
"""

from __future__ import annotations

_STATE: dict = {"installed": False, "in_kernel": False, "patched": set(), "index_fixed": False}


def _scalar_index(self) -> int:
    return int(self.handle.data.item())


def scalar_loop_bounds() -> bool:
    """Installs the ``__index__`` fix once; True when it is active."""
    if _STATE["index_fixed"]:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    if original is None:
        return False

    def patch_with_scalar_index(fn):
        scope = original(fn)
        if hasattr(scope, "set_attr"):  # restored with the rest of the patch
            scope.set_attr(tl.core.tensor, "__index__", _scalar_index)
        return scope

    interpreter._patch_lang = patch_with_scalar_index
    _STATE["index_fixed"] = True
    return True


class _NoPatch:
    def restore(self) -> None:
        pass


def skip_repatching() -> bool:
    """Installs the shortcut once; True when it is active."""
    if _STATE["installed"]:
        return True
    try:
        from triton.runtime import interpreter
    except Exception:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    if original is None:
        return False

    def language_modules(fn) -> set[int]:
        import triton.language as tl

        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_once_per_kernel(fn):
        modules = language_modules(fn)
        if _STATE["in_kernel"] and modules <= _STATE["patched"]:
            return _NoPatch()  # a helper whose language modules this kernel already patched
        scope = original(fn)
        _STATE["patched"] |= modules
        if _STATE["in_kernel"]:
            return scope  # a helper that patched more modules: they stay patched, as before
        restore = scope.restore

        def restore_and_leave():
            _STATE["in_kernel"] = False
            _STATE["patched"] = set()
            restore()

        scope.restore = restore_and_leave
        _STATE["in_kernel"] = True
        return scope

    interpreter._patch_lang = patch_once_per_kernel
    _STATE["installed"] = True
    return True
