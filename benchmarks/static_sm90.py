"""Static analysis of Triton kernels for an H100 (sm_90), without a GPU.

Everything here is a *model*, read off compiled code; nothing is timed.

* ``intercept_launches()`` replaces ``JITFunction.run`` so that every kernel launch made inside it
  is compiled for ``sm_90`` through the JIT's own binder (the same argument specialization, i.e.
  16-byte alignment and divisibility hints and ``== 1`` constants, that a real launch on a GPU
  gets) instead of being run. Each launch is recorded with its grid, its scalar arguments and the
  bytes of its tensor arguments. Run it with ``TRITON_INTERPRET`` unset, on CPU tensors.
* ``analyse()`` reads a compiled kernel: registers, local memory (spills), shared memory, and the
  SASS from ``nvdisasm``: instruction mix and loops (back edges).
* ``model_launch()`` turns a launch into a modelled time with the constants of ``HOPPER``:
  ``max(issue time, memory time) + launch overhead``, where

  - issue time: the dynamic warp instructions of one program (every SASS instruction times the
    trip counts of the loops around it, which the caller supplies) times its warps, limited by
    the busiest of the SM's pipes and its 4 dispatch slots per clock; programs are spread over
    132 SMs (the busiest SM runs ``ceil(programs / 132)`` of them) and an SM with fewer than 2
    resident warps per scheduler is assumed to issue proportionally less;
  - memory time: compulsory bytes (every tensor argument read or written once) at HBM3 speed;
  - launch overhead: a fixed GPU-side cost per launch (host-side launch cost is not modelled).

  The model ignores cache misses beyond compulsory traffic, latency that warps cannot hide,
  bank conflicts and divergence; conditionally executed code inside a loop is counted on every
  trip. Shared-memory loads are charged by width even where lanes share addresses in pairs, which
  the hardware serves in half the wavefronts (the row operand of many float32 FMA dots), so their
  cost may be overstated up to 2x. It is meant to rank designs and to be checked against a GPU
  measurement.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SM = 90


@dataclass(frozen=True)
class Hopper:
    """Constants of the model: an H100 SXM5 (132 SMs). Pipe rates are warp instructions per clock
    per SM; tensor rates are multiply-adds per clock per SM for ``mma.sync`` (HMMA/DMMA, about
    60% of the wgmma peak) and for wgmma (HGMMA)."""

    sms: int = 132
    clock_hz: float = 1.755e9
    dram_bytes_per_s: float = 3.35e12
    launch_s: float = 2e-6
    registers_per_sm: int = 65536
    register_unit: int = 8  # registers per thread are allocated in multiples of 8 (256 per warp)
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    schedulers: int = 4
    warps_per_scheduler_for_full_issue: int = 2
    dispatch_per_clock: float = 4.0
    pipe_rates: tuple = (
        ("fp32", 4.0),  # 128 FP32 lanes
        ("fp64", 2.0),  # 64 FP64 lanes
        ("alu", 2.0),  # 64 INT32 / logic lanes
        ("sfu", 0.5),  # 16 MUFU / conversion lanes
        ("lsu", 1.0),  # 32 lanes; a wide access costs one cycle per 128 bytes of the warp
    )
    tensor_fma_per_clock: tuple = (
        ("bf16", 1228.0),
        ("f16", 1228.0),
        ("tf32", 614.0),
        ("f64", 128.0),
        ("bf16-wgmma", 2048.0),
        ("f16-wgmma", 2048.0),
        ("tf32-wgmma", 1024.0),
    )

    def rate(self, pipe: str) -> float:
        return dict(self.pipe_rates)[pipe]

    def tensor_rate(self, kind: str) -> float:
        return dict(self.tensor_fma_per_clock)[kind]


HOPPER = Hopper()

# ----------------------------------------------------------------------------------------------
# SASS
# ----------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*(.*?)\s*;"
)
_LABEL = re.compile(r"^\s*\.?(L_x_\d+):")
_TARGET = re.compile(r"`\(\.?(L_x_\d+)\)")

FP32 = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "HFMA2", "HADD2", "HMUL2"}
FP64 = {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX"}
TENSOR = {"HMMA", "HGMMA", "DMMA", "IMMA", "BMMA", "QGMMA", "IGMMA"}
SFU = {"MUFU", "F2F", "I2F", "F2I", "I2FP", "F2IP"}
LOADS = {"LDG", "LDS", "LDL", "LDSM", "LD", "LDGSTS", "UTMALDG"}
STORES = {"STG", "STS", "STL", "ST", "STSM", "UTMASTG"}
ATOMICS = {"ATOM", "ATOMG", "ATOMS", "RED", "REDG"}
SHUFFLES = {"SHFL"}
MATRIX_MOVES = {"LDSM", "STSM"}  # ldmatrix / stmatrix
CONTROL = {"BRA", "EXIT", "BSSY", "BSYNC", "NOP", "WARPSYNC", "RET", "CALL", "JMP", "YIELD"}
BARRIERS = {"BAR", "MEMBAR", "FENCE", "DEPBAR", "ERRBAR", "CCTL"}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # base name, e.g. "LDG"
    modifiers: tuple[str, ...]  # e.g. ("E", "128")
    operands: str

    @property
    def pipe(self) -> str:
        op = self.opcode
        if op == "HFMA2" and "MMA" in self.modifiers:
            return "alu"  # `HFMA2.MMA Rx, -RZ, RZ, c` is ptxas' idiom for moving a constant
        if op in FP32:
            return "fp32"
        if op in FP64:
            return "fp64"
        if op in TENSOR:
            return "tensor"
        if op in SFU:
            return "sfu"
        if op in LOADS | STORES | ATOMICS | SHUFFLES:
            return "lsu"
        if op.startswith("U") or op in CONTROL or op in BARRIERS or op in {"S2UR", "R2UR"}:
            return "dispatch"  # uniform datapath, control flow, barriers: an issue slot only
        return "alu"

    @property
    def access_bytes(self) -> int:
        """Bytes per lane of a memory access (4 unless the opcode says otherwise). ldmatrix and
        stmatrix (``LDSM.16.M88.4``) move 128 bytes per warp for each of their 1, 2 or 4 8x8
        matrices of 16-bit values: 4 bytes per lane per matrix."""
        if self.opcode in MATRIX_MOVES:
            return 4 * next((int(m) for m in self.modifiers if m in ("2", "4")), 1)
        for m in self.modifiers:
            if m in ("128", "64", "32"):
                return int(m) // 8
            if m in ("U16", "S16"):
                return 2
            if m in ("U8", "S8"):
                return 1
        return 4

    @property
    def lsu_cycles(self) -> float:
        """LSU cycles of one warp instruction: one per 128 bytes the warp moves, at least one."""
        if self.opcode in SHUFFLES:
            return 1.0
        return max(1.0, 32 * self.access_bytes / 128)

    def tensor_kind_and_fma(self) -> tuple[str, int]:
        """(input type, multiply-adds per instruction) of an MMA instruction."""
        mods = self.modifiers
        shape = mods[0] if mods else ""
        m = n = k = 0
        if self.opcode == "HGMMA" and shape.count("x") == 2:
            # one warpgroup instruction (64 x N x K), issued by each of its 4 warps
            m, n, k = (int(x) for x in shape.split("x"))
            m //= 4
        elif self.opcode == "DMMA" and shape.isdigit():
            m, n, k = int(shape[0]), int(shape[1]), int(shape[2:])  # "884"
        elif shape.isdigit() and len(shape) >= 4:
            m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])  # "16816", "1688", "1684"
        if self.opcode == "DMMA":
            kind = "f64"
        elif "TF32" in mods:
            kind = "tf32"
        elif "BF16" in mods:
            kind = "bf16"
        else:
            kind = "f16"
        if self.opcode == "HGMMA":
            kind += "-wgmma"
        return kind, m * n * k

    @property
    def category(self) -> str:
        """The report's instruction classes."""
        op = self.opcode
        if op == "FFMA" or op == "FFMA32I":
            return "FFMA"
        if self.pipe == "alu" and op in FP32:
            return "other"
        if op in FP32:
            return "FP32 other"
        if op in FP64:
            return "FP64"
        if op in TENSOR:
            return op
        if op in SHUFFLES:
            return "SHFL"
        if op == "MUFU":
            return "MUFU"
        if op in LOADS:
            return f"{op}.{8 * self.access_bytes}"
        if op in STORES:
            return f"{op}.{8 * self.access_bytes}"
        if op in ATOMICS:
            return "ATOM"
        if op in BARRIERS:
            return "BAR"
        return "other"


@dataclass
class Loop:
    start: int  # address of the first instruction of the body
    end: int  # address of the back-edge branch
    children: list[Loop] = field(default_factory=list)

    def contains(self, address: int) -> bool:
        return self.start <= address <= self.end


def parse_sass(text: str) -> tuple[list[Instruction], list[Loop]]:
    """Instructions of the (single) kernel in ``nvdisasm -c`` output, and its loops in pre-order
    (outer loop first, then its inner loops in address order)."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    branches: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        address = int(m.group(1), 16)
        inst = Instruction(address, m.group(3), tuple(m.group(4).split(".")[1:]), m.group(5))
        instructions.append(inst)
        for name in pending:
            labels[name] = address
        pending = []
        target = _TARGET.search(line)
        if target and inst.opcode in ("BRA", "JMP"):
            branches.append((address, target.group(1), m.group(2) or ""))
    last_exit = max((i.address for i in instructions if i.opcode == "EXIT"), default=None)
    by_start: dict[int, int] = {}
    for address, name, _predicate in branches:
        start = labels.get(name)
        if start is None or start > address:
            continue
        if start == address and last_exit is not None and address > last_exit:
            continue  # the trailing `BRA self` after the last EXIT is never executed
        by_start[start] = max(by_start.get(start, address), address)
    flat = sorted((Loop(s, e) for s, e in by_start.items()), key=lambda lp: (lp.start, -lp.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for loop in flat:
        while stack and not stack[-1].contains(loop.start):
            stack.pop()
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)
    return instructions, _preorder(roots)


def _preorder(loops: list[Loop]) -> list[Loop]:
    out = []
    for loop in loops:
        out.append(loop)
        out.extend(_preorder(loop.children))
    return out


def loop_depths(loops: list[Loop]) -> list[int]:
    """Nesting depth of every loop of a pre-order list (0 = outermost)."""
    depths = []
    for i, loop in enumerate(loops):
        depths.append(sum(1 for other in loops[:i] if other.contains(loop.start)))
    return depths


# ----------------------------------------------------------------------------------------------
# compiled kernels
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    from triton import knobs

    tool = getattr(knobs.nvidia, name, None)
    path = getattr(tool, "path", None) if tool is not None else None
    path = path or shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} not found: it ships with triton's NVIDIA backend")
    return path


@dataclass
class KernelAnalysis:
    """What the compiled code of one kernel variant says."""

    name: str
    num_warps: int
    registers: int
    local_bytes: int  # local memory per thread: spills (or local arrays)
    spill_stores: int  # STL instructions in the SASS
    spill_loads: int  # LDL instructions
    shared_bytes: int
    instructions: list[Instruction]
    loops: list[Loop]

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0

    def blocks_per_sm(self, gpu: Hopper = HOPPER) -> int:
        regs = gpu.register_unit * math.ceil(max(self.registers, 1) / gpu.register_unit)
        by_regs = gpu.registers_per_sm // (regs * 32 * self.num_warps)
        by_warps = gpu.max_warps_per_sm // self.num_warps
        limits = [by_regs, by_warps, gpu.max_blocks_per_sm]
        if self.shared_bytes:
            limits.append(gpu.shared_per_sm // (self.shared_bytes + gpu.shared_reserved_per_block))
        return max(0, min(limits))

    def static_mix(self) -> dict[str, int]:
        mix: dict[str, int] = {}
        for inst in self.instructions:
            mix[inst.category] = mix.get(inst.category, 0) + 1
        return mix


_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def analyse(compiled) -> KernelAnalysis:
    """Registers, spills, shared memory, SASS and loops of a compiled kernel (``triton.compile``
    output for an NVIDIA target)."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        # the two tools in parallel: they are most of the analysis' time
        pipe = subprocess.PIPE
        tools = [
            subprocess.Popen([_tool(name), *flags, str(path)], stdout=pipe, stderr=pipe, text=True)
            for name, flags in (("cuobjdump", ["-res-usage"]), ("nvdisasm", ["-c"]))
        ]
        (resources, err1), (sass, err2) = (tool.communicate() for tool in tools)
        for tool, err in zip(tools, (err1, err2), strict=True):
            if tool.returncode:
                raise RuntimeError(f"{tool.args[0]} failed on {compiled.name}: {err[-2000:]}")
    m = _RESOURCES.search(resources)
    if not m:
        raise RuntimeError(f"cannot read the resource usage of {compiled.name}: {resources!r}")
    registers, stack, shared, local = (int(x) for x in m.groups())
    instructions, loops = parse_sass(sass)
    metadata = compiled.metadata
    return KernelAnalysis(
        name=metadata.name,
        num_warps=metadata.num_warps,
        registers=registers,
        local_bytes=local + stack,
        spill_stores=sum(1 for i in instructions if i.opcode == "STL"),
        spill_loads=sum(1 for i in instructions if i.opcode == "LDL"),
        shared_bytes=max(shared, getattr(metadata, "shared", 0) or 0),
        instructions=instructions,
        loops=loops,
    )


# ----------------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One intercepted kernel launch."""

    kernel: str
    grid: tuple[int, ...]
    scalars: dict  # name -> value of every non-tensor argument, constexprs included
    tensor_bytes: int  # bytes of the distinct storages passed as tensor arguments
    variant: str  # the compiled variant's key (constexprs, specialization, options)
    compiled: object
    tags: dict = field(default_factory=dict)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", SM, 32)


@contextlib.contextmanager
def intercept_launches(tags: dict | None = None):
    """Compile every Triton launch inside the block for sm_90 instead of running it; yields the
    list the launches are appended to. ``tags`` (mutable) is copied into each launch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: launches are compiled, not interpreted")
    import torch
    import triton
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = _target()
    backend = make_backend(target)
    records: list[Launch] = []
    binders: dict = {}
    compiled_cache: dict = {}
    original = JITFunction.run

    def compile_instead(self, *args, grid, warmup=False, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*args, **kwargs)
        key = (self, str(specialization), str(options))
        if key not in compiled_cache:
            opts, signature, constexprs, attrs = self._pack_args(
                backend, kwargs, bound, specialization, options
            )
            compiled_cache[key] = triton.compile(
                ASTSource(self, signature, constexprs, attrs), target=target, options=opts.__dict__
            )
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        storages: dict[int, int] = {}
        scalars = {}
        for name, value in bound.items():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            elif isinstance(value, (int, float, bool, str)) or value is None:
                scalars[name] = value
            else:
                scalars[name] = str(value)
        records.append(
            Launch(
                kernel=self.fn.__name__,
                grid=grid,
                scalars=scalars,
                tensor_bytes=sum(storages.values()),
                variant=f"{self.fn.__name__}:{specialization}:{options}",
                compiled=compiled_cache[key],
                tags=dict(tags or {}),
            )
        )
        return None

    JITFunction.run = compile_instead
    try:
        yield records
    finally:
        JITFunction.run = original


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelledLaunch:
    kernel: str
    grid: tuple[int, ...]
    programs: int
    num_warps: int
    registers: int
    spills: bool
    local_bytes: int
    shared_bytes: int
    blocks_per_sm: int
    waves: float
    loops_matched: bool
    trips: list
    static_instructions: int
    dynamic_per_program: dict  # category -> warp instructions of one program (all its warps)
    issue_s: float
    memory_s: float
    launch_s: float
    bound: str
    tensor_bytes: int

    @property
    def time_s(self) -> float:
        return max(self.issue_s, self.memory_s) + self.launch_s


def _body_histogram(loop: Loop, instructions: list[Instruction]) -> dict[str, int]:
    """Counts of a loop body's work instructions (memory, floating point, tensor, special
    function), inner loops included; the integer bookkeeping of unrolled copies differs."""
    counts: dict[str, int] = {}
    for inst in instructions:
        if loop.contains(inst.address) and inst.pipe in ("fp32", "fp64", "lsu", "tensor", "sfu"):
            counts[inst.opcode] = counts.get(inst.opcode, 0) + 1
    return counts


def _unroll_factor(main: Loop, remainder: Loop, instructions: list[Instruction]) -> int | None:
    """The factor by which ``main`` repeats ``remainder``'s body, when LLVM unrolled a loop with a
    runtime trip count into a main loop and a remainder loop (None when they do not look so):
    every work opcode of the remainder appears in the main loop the same integer number of
    times over."""
    big, small = _body_histogram(main, instructions), _body_histogram(remainder, instructions)
    if not small:
        return None
    ratios = {big.get(op, 0) / n for op, n in small.items()}
    if len(ratios) != 1:
        return None
    factor = ratios.pop()
    return int(factor) if factor >= 2 and factor == int(factor) else None


def match_loops(analysis: KernelAnalysis, trips: list[float] | None) -> list[float] | None:
    """Trip counts of every SASS loop (pre-order) from the trip counts of the source loops
    (pre-order), or None when the loop structure does not match. A source loop that LLVM
    unrolled shows up as a main loop followed by a remainder loop, which are recognised by their
    bodies and given ``trips // factor`` and ``trips % factor`` iterations. A source loop of at
    most one trip may have been compiled away (its bound a value the JIT specialised, like a
    slice of one capsule): when the full list does not match, the fewest such loops are
    dropped that make it match."""
    if trips is None:
        return None
    found = _match_loops(analysis, trips)
    short = [i for i, t in enumerate(trips) if t <= 1]
    for k in range(1, len(short) + 1):
        if found is not None:
            break
        for dropped in itertools.combinations(short, k):
            found = _match_loops(analysis, [t for i, t in enumerate(trips) if i not in dropped])
            if found is not None:
                break
    return found


def _match_loops(analysis: KernelAnalysis, trips: list[float]) -> list[float] | None:
    loops = analysis.loops
    if len(trips) == len(loops):
        return list(trips)
    matched: list[float] = []
    i = 0
    for t in trips:
        if i >= len(loops):
            return None
        main = loops[i]
        nxt = loops[i + 1] if i + 1 < len(loops) else None
        factor = None
        if nxt is not None and not main.contains(nxt.start):
            factor = _unroll_factor(main, nxt, analysis.instructions)
        if factor:
            matched += [t // factor, t % factor]
            i += 2
        else:
            matched.append(t)
            i += 1
    return matched if i == len(loops) else None


def dynamic_weights(analysis: KernelAnalysis, trips: list[float] | None) -> tuple[list, bool]:
    """Execution count of every instruction per warp of one program, and whether ``trips`` (trip
    counts of the source loops in pre-order) matched the loops found. Without a match every
    instruction counts once."""
    loops = analysis.loops
    per_loop = match_loops(analysis, trips)
    matched = per_loop is not None
    weights = []
    for inst in analysis.instructions:
        w = 1.0
        if matched:
            for loop, t in zip(loops, per_loop, strict=True):
                if loop.contains(inst.address):
                    w *= t
        weights.append(w)
    return weights, matched


def programs_per_sm(programs: int, blocks_per_sm: int, sms: int) -> tuple[int, int]:
    """(programs each SM runs, how many of them are resident at once): ``ceil(programs / SMs)``
    and the blocks that fit an SM side by side (at least 1), at most that many."""
    per_sm = math.ceil(programs / sms)
    return per_sm, min(max(blocks_per_sm, 1), per_sm)


def model_launch(launch: Launch, analysis: KernelAnalysis, trips: list[float] | None,
                 gpu: Hopper = HOPPER) -> ModelledLaunch:  # fmt: skip
    """The modelled time of one launch (see the module docstring)."""
    weights, matched = dynamic_weights(analysis, trips)
    warps = analysis.num_warps
    pipe_cycles = {name: 0.0 for name, _ in gpu.pipe_rates}
    tensor_cycles = 0.0
    total = 0.0
    per_category: dict[str, float] = {}
    for inst, w in zip(analysis.instructions, weights, strict=True):
        n = w * warps  # warp instructions of this program
        total += n
        per_category[inst.category] = per_category.get(inst.category, 0.0) + n
        pipe = inst.pipe
        if pipe == "tensor":
            kind, fma = inst.tensor_kind_and_fma()
            tensor_cycles += n * fma / gpu.tensor_rate(kind)
        elif pipe == "lsu":
            pipe_cycles["lsu"] += n * inst.lsu_cycles / gpu.rate("lsu")
        elif pipe != "dispatch":
            pipe_cycles[pipe] += n / gpu.rate(pipe)
    candidates = {"dispatch": total / gpu.dispatch_per_clock, "tensor": tensor_cycles}
    candidates.update(pipe_cycles)
    bound_pipe = max(candidates, key=candidates.get)
    program_cycles = candidates[bound_pipe]
    blocks = max(analysis.blocks_per_sm(gpu), 1)
    per_sm, resident = programs_per_sm(launch.programs, blocks, gpu.sms)
    warps_per_scheduler = resident * warps / gpu.schedulers
    efficiency = min(1.0, warps_per_scheduler / gpu.warps_per_scheduler_for_full_issue)
    issue_s = per_sm * program_cycles / efficiency / gpu.clock_hz
    memory_s = launch.tensor_bytes / gpu.dram_bytes_per_s
    bound = f"issue ({bound_pipe})" if issue_s >= memory_s else "memory"
    return ModelledLaunch(
        kernel=launch.kernel,
        grid=launch.grid,
        programs=launch.programs,
        num_warps=warps,
        registers=analysis.registers,
        spills=analysis.spills,
        local_bytes=analysis.local_bytes,
        shared_bytes=analysis.shared_bytes,
        blocks_per_sm=analysis.blocks_per_sm(gpu),
        waves=launch.programs / (gpu.sms * blocks),
        loops_matched=matched,
        trips=list(trips or []),
        static_instructions=len(analysis.instructions),
        dynamic_per_program=per_category,
        issue_s=issue_s,
        memory_s=memory_s,
        launch_s=gpu.launch_s,
        bound=bound,
        tensor_bytes=launch.tensor_bytes,
    )
