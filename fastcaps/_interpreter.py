"""Make Triton's interpreter (TRITON_INTERPRET=1) fast enough to run the kernels in CI, and
faithful to the GPU's TF32 dots.

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

``tensor_float32_dots()`` makes the interpreter's float32 ``tl.dot`` round its inputs the way an
NVIDIA GPU's tensor cores do, instead of computing every input precision in full float32:
``"tf32"`` keeps the top 10 mantissa bits of each input (the tensor cores ignore the other 13);
``"tf32x3"`` is Triton's 3-pass split (``big = cvt.rna.tf32(x)``, ``small = x - big``, then
``small_a big_b + big_a small_b + big_a big_b``, with a NaN from the small parts dropped as
Triton does); ``"ieee"`` is unchanged. Products of TF32 values are exact in float32, so NumPy's
float32 matmul of the rounded inputs is the GPU's result up to the order of the float32 sums.
Installed with the other fixes, so tests of TF32 paths see TF32 errors.
"""

from __future__ import annotations

import contextlib

import numpy as np

_STATE: dict = {
    "installed": False, "in_kernel": False, "patched": set(), "index_fixed": False,
    "tf32": False, "exact": False,
}  # fmt: skip

_TF32_KEEP = np.uint32(0xFFFFE000)  # sign, exponent and the top 10 mantissa bits
_EXPONENT = np.uint32(0x7F800000)


def _to_tf32(x: np.ndarray, half_ulp: int) -> np.ndarray:
    """float32 -> TF32 (inf and NaN kept): ``half_ulp`` 0 truncates, 0x1000 rounds to nearest
    with ties away from zero."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    special = (bits & _EXPONENT) == _EXPONENT
    return np.where(special, bits, (bits + np.uint32(half_ulp)) & _TF32_KEEP).view(np.float32)


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    """float32 -> the TF32 value the tensor cores read (the low 13 mantissa bits dropped)."""
    return _to_tf32(x, 0)


def tf32_round(x: np.ndarray) -> np.ndarray:
    """float32 -> TF32 rounded to nearest, ties away from zero (PTX ``cvt.rna.tf32.f32``)."""
    return _to_tf32(x, 0x1000)


def _tensor_float32_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str):
    """acc + a @ b as a GPU computes it for float32 inputs at ``precision`` "TF32"/"TF32x3"."""
    with np.errstate(invalid="ignore", over="ignore"):
        if precision == "TF32":
            return np.matmul(tf32_truncate(a), tf32_truncate(b), dtype=np.float32) + acc
        a_big, b_big = tf32_round(a), tf32_round(b)
        a_small, b_small = tf32_truncate(a - a_big), tf32_truncate(b - b_big)
        out = np.matmul(a_small, b_big, dtype=np.float32) + acc
        out = np.matmul(a_big, b_small, dtype=np.float32) + out
        out = np.where(np.isnan(out), acc, out)
        return np.matmul(a_big, b_big, dtype=np.float32) + out


def _interpreter_module():
    """triton.runtime.interpreter, or None when triton cannot be imported."""
    try:
        from triton.runtime import interpreter
    except Exception:
        return None
    return interpreter


def tensor_float32_dots() -> bool:
    """Installs the TF32 rounding of float32 ``tl.dot`` once; True when it is active."""
    if _STATE["tf32"]:
        return True
    interpreter = _interpreter_module()
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    original = getattr(builder, "create_dot", None)
    if original is None or handle is None:
        return False

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        precision = getattr(input_precision, "name", str(input_precision))
        rounded = precision in ("TF32", "TF32x3") and not _STATE["exact"]
        if rounded and a.data.dtype == b.data.dtype == np.float32:
            out = _tensor_float32_dot(a.data, b.data, d.data, precision)
            return handle(out.astype(d.data.dtype), d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _STATE["tf32"] = True
    return True


def _scalar_index(self) -> int:
    return int(self.handle.data.item())


def scalar_loop_bounds() -> bool:
    """Installs the ``__index__`` fix once; True when it is active."""
    if _STATE["index_fixed"]:
        return True
    interpreter = _interpreter_module()
    original = getattr(interpreter, "_patch_lang", None)
    if original is None:
        return False
    import triton.language as tl

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
    interpreter = _interpreter_module()
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


@contextlib.contextmanager
def exact_float32_dots():
    """Inside the block the interpreter's float32 dots are full float32 at every precision again
    (tests that check a TF32 path's algebra to float32 tolerances)."""
    before = _STATE["exact"]
    _STATE["exact"] = True
    try:
        yield
    finally:
        _STATE["exact"] = before
