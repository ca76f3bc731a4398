"""The text analysis behind the static resource report: ptxas log, SASS opcodes, PTX loads, alignment, occupancy."""

import pytest

from tests.static_analysis import (
    analyze_ptx,
    global_access_name,
    occupancy,
    parse_ptxas_log,
    rows_aligned,
    sass_summary,
)

PTXAS_LOG = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    72 bytes stack frame, 68 bytes spill stores, 140 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 72 bytes cumulative stack size
"""

SASS = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/              @!P0 LDG.E R8, desc[UR4][R6.64] ;
        /*0120*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;
        /*0130*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0140*/                   HMMA.16816.F32.BF16 R10, R4, R8, R10 ;
        /*0150*/                   STG.E.U16 desc[UR4][R2.64], R9 ;
        /*0160*/                   LDG.E.64.CONSTANT R4, desc[UR4][R2.64] ;
"""

# Pointer params 0 (IDX) and 1 (SRC): an index loaded from IDX before the loop gathers SRC inside it.
PTX = """
.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .u64 .ptr .global .align 1 _k_param_1,
	.param .u32 _k_param_2
)
{
	ld.param.b64 	%rd1, [_k_param_0];
	ld.param.b64 	%rd2, [_k_param_1];
	ld.param.b32 	%r1, [_k_param_2];
	.loc	1 10 5                          // k.py:10:5
	ld.global.b64 	%rd3, [%rd1+0];
	mad.wide.s32 	%rd4, %r1, 2, %rd2;
$L__BB0_1:
	.loc	1 12 9                          // k.py:12:9
	shl.b64 	%rd5, %rd3, 1;
	add.s64 	%rd6, %rd4, %rd5;
	// begin inline asm
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd6 + 0 ];
	// end inline asm
	@%p1 cp.async.ca.shared.global [ %r6 + 0 ], [ %rd6 + 0 ], 0x4, %r7;
	add.s64 	%rd4, %rd4, 64;
	@%p2 bra 	$L__BB0_1;
	st.global.b16 	[%rd2+0], %rs1;
	ret;
}
	.file	1 "/src/k.py"
"""


def test_ptxas_log():
    assert parse_ptxas_log(PTXAS_LOG) == {"regs": 255, "spill_stores": 68, "spill_loads": 140, "stack": 72}
    assert parse_ptxas_log("ptxas info    : Used 32 registers")["spill_loads"] == 0
    with pytest.raises(ValueError, match="register count"):
        parse_ptxas_log("nothing")


def test_sass_names_and_counts():
    assert global_access_name("LDGSTS.E.BYPASS.LTC128B.128") == "LDGSTS.128"
    assert global_access_name("LDG.E") == "LDG.32" and global_access_name("FADD") is None
    summary = sass_summary(SASS)
    assert summary["global"] == {"LDG.128": 1, "LDG.32": 1, "LDG.64": 1, "LDGSTS.128": 1, "STG.U16": 1}
    assert summary["mma"] == {"mma.sync": 1, "wgmma": 1}


def test_ptx_loads_operands_and_main_loop():
    report = analyze_ptx(PTX, ["IDX", "SRC", "n"], {"IDX", "SRC"})
    got = [(a.kind, a.width, a.operand, a.in_loop, a.where) for a in report.accesses]
    assert got == [
        ("ld", 8, "IDX", False, "k.py:10"),
        ("ld", 16, "SRC", True, "k.py:12"),  # the loaded index is data: the gathered address is SRC's alone
        ("cp.async", 4, "SRC", True, "k.py:12"),
        ("st", 2, "SRC", False, "k.py:12"),
    ]
    assert report.has_loop and [a.width for a in report.main_loop_loads()] == [16, 4]
    loopless = analyze_ptx(PTX.replace("@%p2 bra 	$L__BB0_1;", ""), ["IDX", "SRC", "n"], {"IDX", "SRC"})
    assert [a.width for a in loopless.main_loop_loads()] == [8, 16, 4]


@pytest.mark.parametrize(
    "shape,strides,itemsize,aligned",
    [
        ([256, 3, 224, 224], [150528, 50176, 224, 1], 2, True),  # an image: 448-byte rows
        ([256, 196, 768], [151296, 768, 1], 2, True),  # x[:, 1:] of [256, 197, 768]: a view, rows still aligned
        ([256, 16, 65], [1040, 65, 1], 4, False),  # 260-byte rows
        ([1280, 3, 14, 14], [588, 196, 14, 1], 2, False),  # 28-byte rows
        ([256, 49], [196, 1], 8, False),  # ids_keep of 196 patches, a strided view: 392-byte rows
        ([256, 64], [256, 1], 8, True),
        ([1, 1, 512], [512, 512, 1], 4, True),
        ([768, 4], [1, 768], 2, False),  # transposed: no unit-stride rows
        ([1], [1], 4, False),
    ],
)
def test_rows_aligned(shape, strides, itemsize, aligned):
    assert rows_aligned({"shape": shape, "strides": strides, "itemsize": itemsize}) is aligned


@pytest.mark.parametrize(
    "regs,smem,warps,ctas_per_sm,limit",
    [  # the CUDA occupancy calculator's rules for sm_90
        (182, 98304, 8, 1, "regs"),
        (119, 40960, 4, 4, "regs"),
        (161, 25088, 4, 3, "regs"),
        (94, 20480, 4, 5, "regs"),  # 20 warps by registers (21 floored to a multiple of 4); smem allows 10 CTAs
        (32, 98304, 4, 2, "smem"),
        (255, 73728, 8, 1, "regs"),
        (32, 1024, 4, 16, "warps"),
        (54, 512, 4, 9, "regs"),
        (40, 2048, 4, 12, "regs"),
        (24, 0, 1, 32, "ctas"),
    ],
)
def test_occupancy(regs, smem, warps, ctas_per_sm, limit):
    occ = occupancy(regs, smem, warps, ctas=132 * ctas_per_sm * 2)
    assert (occ["ctas_per_sm"], occ["limited_by"]) == (ctas_per_sm, limit)
    assert occ["warps_per_sm"] == ctas_per_sm * warps and occ["waves"] == pytest.approx(2.0)
