"""The static sm_90 model's own pieces, on hand-written SASS: instruction classes, loops and their
trip counts (including LLVM's unrolled main + remainder pairs), occupancy and the time model.
The report over the real kernels runs in tests/test_gpu_static.py."""

import pytest

from benchmarks.static_sm90 import (
    HOPPER,
    Instruction,
    KernelAnalysis,
    Launch,
    dynamic_weights,
    match_loops,
    model_launch,
    parse_sass,
)

NESTED = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_2:
        /*0020*/                   FFMA R8, R4, R5, R8 ;
        /*0030*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;
        /*0040*/               @P0 BRA `(.L_x_2) ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   STG.E R2.64, R8 ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""

# LLVM unrolled a loop with a runtime trip count by 4 into a main loop and a remainder loop
UNROLLED = """
        /*0000*/                   MOV R1, RZ ;
.L_x_0:
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0030*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;
        /*0040*/                   LDG.E R7, desc[UR4][R2.64+0xc] ;
        /*0050*/                   FADD R1, R1, R4 ;
        /*0060*/                   FADD R1, R1, R5 ;
        /*0070*/                   FADD R1, R1, R6 ;
        /*0080*/                   FADD R1, R1, R7 ;
        /*0090*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*00a0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00b0*/                   FADD R1, R1, R4 ;
        /*00c0*/               @P1 BRA `(.L_x_1) ;
        /*00d0*/                   EXIT ;
"""


def analysis_of(sass: str, num_warps: int = 4, registers: int = 64) -> KernelAnalysis:
    instructions, loops = parse_sass(sass)
    return KernelAnalysis("k", num_warps, registers, 0, 0, 0, 0, instructions, loops)


def test_loops_nest_and_the_trailing_self_branch_is_not_one():
    instructions, loops = parse_sass(NESTED)
    assert [(loop.start, loop.end) for loop in loops] == [(0x10, 0x60), (0x20, 0x40)]
    assert [i.opcode for i in instructions][:3] == ["S2R", "LDG", "FFMA"]


def test_instruction_classes_and_widths():
    instructions, _ = parse_sass(NESTED)
    by_op = {i.opcode: i for i in instructions}
    assert by_op["LDG"].access_bytes == 16 and by_op["LDG"].lsu_cycles == 4
    assert by_op["SHFL"].category == "SHFL" and by_op["SHFL"].pipe == "lsu"
    assert by_op["FFMA"].pipe == "fp32" and by_op["EXIT"].pipe == "dispatch"
    assert by_op["HMMA"].tensor_kind_and_fma() == ("bf16", 16 * 8 * 16)
    ldmatrix = ((("16", "M88"), 1), (("16", "M88", "2"), 2), (("16", "MT88", "4"), 4))
    for modifiers, cycles in ldmatrix:
        matrices = Instruction(0, "LDSM", modifiers, "")  # 128 bytes per warp per 8x8 matrix
        assert matrices.lsu_cycles == cycles and matrices.category == f"LDSM.{32 * cycles}"
    stmatrix = Instruction(0, "STSM", ("16", "M88", "4"), "")
    assert stmatrix.pipe == "lsu" and stmatrix.lsu_cycles == 4 and stmatrix.category == "STSM.128"
    wgmma = Instruction(0, "HGMMA", ("64x128x16", "F32", "BF16"), "")
    assert wgmma.tensor_kind_and_fma() == ("bf16-wgmma", 64 * 128 * 16 // 4)


def test_nested_trip_counts_multiply():
    analysis = analysis_of(NESTED)
    weights, matched = dynamic_weights(analysis, [10, 3])
    assert matched
    by_address = {i.address: w for i, w in zip(analysis.instructions, weights, strict=True)}
    assert by_address[0x0] == 1 and by_address[0x10] == 10 and by_address[0x20] == 30
    assert by_address[0x50] == 10 and by_address[0x70] == 1


def test_an_unrolled_loop_is_matched_to_its_source_loop():
    analysis = analysis_of(UNROLLED)
    assert len(analysis.loops) == 2
    assert match_loops(analysis, [10]) == [2, 2]  # 10 = 4 * 2 + 2
    weights, matched = dynamic_weights(analysis, [10])
    loads = sum(w for i, w in zip(analysis.instructions, weights, strict=True) if i.opcode == "LDG")
    assert matched and loads == 10


def test_a_wrong_loop_structure_is_reported():
    analysis = analysis_of(NESTED)
    assert match_loops(analysis, [10]) is None
    assert match_loops(analysis, [10, 3, 2]) is None
    assert not dynamic_weights(analysis, None)[1]


@pytest.mark.parametrize(
    "registers,warps,shared,blocks",
    [(255, 8, 0, 1), (128, 8, 0, 2), (64, 4, 0, 8), (32, 4, 0, 16), (64, 4, 100_000, 2)],
)
def test_blocks_per_sm(registers, warps, shared, blocks):
    analysis = KernelAnalysis("k", warps, registers, 0, 0, 0, shared, [], [])
    assert analysis.blocks_per_sm() == blocks


def test_time_model_waves_occupancy_and_memory():
    line = "        /*{:04x}*/                   FFMA R1, R2, R3, R1 ;"
    ffma = "\n".join(line.format(16 * i) for i in range(400))
    analysis = analysis_of(ffma + "\n        /*1900*/                   EXIT ;", num_warps=8)
    one_wave = Launch("k", (132, 1, 1), {}, 0, "v", None)
    two_waves = Launch("k", (133, 1, 1), {}, 0, "v", None)
    a, b = model_launch(one_wave, analysis, []), model_launch(two_waves, analysis, [])
    assert a.bound.startswith("issue")
    cycles = 401 * 8 / 4  # warp instructions of a program over the 4 dispatch slots
    assert a.issue_s == pytest.approx(cycles / HOPPER.clock_hz)
    assert b.issue_s == pytest.approx(2 * a.issue_s)  # one program more: a second wave
    assert a.time_s == pytest.approx(a.issue_s + HOPPER.launch_s)
    heavy = Launch("k", (132, 1, 1), {}, 10**9, "v", None)
    m = model_launch(heavy, analysis, [])
    assert m.bound == "memory" and m.memory_s == pytest.approx(1e9 / HOPPER.dram_bytes_per_s)
    lonely = model_launch(Launch("k", (1, 1, 1), {}, 0, "v", None), analysis_of(ffma, 1), [])
    assert lonely.issue_s == pytest.approx(400 / 4 / 0.125 / HOPPER.clock_hz)  # 1 warp: 1/8 rate
