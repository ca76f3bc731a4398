"""The harness compiles kernels for sm_80/sm_90 without a GPU and reports what does not compile."""

import pytest

from tests.compile_harness import (
    SHARED_LIMIT,
    KernelSpec,
    assert_compiles,
    autotune_specs,
    capture_in_subprocess,
    compile_launches,
    compile_specs,
)
from tests.static_analysis import summarize

MOD = "tests.harness_kernels"
SIG = {"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "constexpr"}


def test_autotune_configs_compile_with_tensor_cores():
    specs = autotune_specs(MOD, "square_dot", SIG)
    assert [s.constexprs["BLOCK"] for s in specs] == [32, 64]
    results = compile_specs(specs)
    assert len(results) == 4 and all(r["ok"] for r in results), results
    by_arch = {(r["name"], r["arch"]): r for r in results}
    assert all(r["mma"] for r in results)
    assert by_arch[(specs[1].name(), 90)]["wgmma"]
    assert not by_arch[(specs[1].name(), 80)]["wgmma"]


@pytest.mark.parametrize("bad", ["signature", "shared"])
def test_failures_are_reported(bad):
    if bad == "signature":
        spec = KernelSpec(MOD, "square_dot", {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 32})
        results = compile_specs([spec], archs=(80,))
        assert not results[0]["ok"] and "error" in results[0]
    else:
        spec = KernelSpec(MOD, "shared_hog", {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 256})
        results = compile_specs([spec], archs=(90,))
        assert results[0]["ok"] and results[0]["shared"] > SHARED_LIMIT[90]
        with pytest.raises(AssertionError, match="shared"):
            assert_compiles([spec], archs=(90,))


# ---- launches captured from the launch site, specialized as Triton's runtime does ----


@pytest.fixture(scope="module")
def captured():
    return capture_in_subprocess("tests.harness_kernels:capture_examples")


def test_capture_records_each_autotune_config_specialized_like_the_runtime(captured):
    assert [(ln.tags["n"], ln.options["num_warps"]) for ln in captured] == [
        (n, w) for n in (1, 32, 7, "7, X + 1") for w in (2, 4)
    ]
    by_n = {ln.tags["n"]: ln for ln in captured}
    assert by_n[1].signature["n"] == "constexpr" and by_n[1].constexpr_values()["n"] == 1
    assert by_n[32].signature["n"] == "i32" and by_n[32].divisible("n")
    assert by_n[7].signature["n"] == "i32" and not by_n[7].divisible("n")
    assert by_n[7].divisible("X") and by_n[7].divisible("Y")
    shifted = by_n["7, X + 1"]
    assert not shifted.divisible("X") and shifted.divisible("Y")
    assert shifted.tensors["X"]["ptr_mod16"] == 4 and shifted.tensors["X"]["shape"] == [65 * 64 - 1]
    assert len({ln.key() for ln in captured}) == len(captured)
    assert by_n[7].grid == [1] and by_n[7].constexpr_values()["BLOCK"] in (32, 64)


def test_captured_launches_compile_with_their_specialization(captured, tmp_path):
    picked = [ln for ln in captured if ln.tags["n"] in (1, "7, X + 1") and ln.options["num_warps"] == 4]
    first = compile_launches(picked, jobs=2, cache=tmp_path)
    again = compile_launches(picked, jobs=2, cache=tmp_path)
    assert [r["cached"] for r in first] == [False, False] and [r["cached"] for r in again] == [True, True]
    const_n, shifted = (summarize(ln, art) for ln, art in zip(picked, first))
    assert const_n["regs"] > 0 and const_n["mma"] and const_n["spill_stores"] == 0
    # n == 1 is folded into the code: one kernel parameter fewer in the PTX
    assert picked[0].arg_names() == ["X", "Y"] and picked[1].arg_names() == ["X", "Y", "n"]
    assert ".param .u32" not in first[0]["ptx"] and ".param .u32" in first[1]["ptx"]
    # the aligned X is read in 16-byte vectors; X + 1 is not aligned, so its narrow loads are no offence
    assert const_n["main_loads"] and all(k.startswith(("X:", "Y:")) for k in const_n["main_loads"])
    assert "X:16B" in const_n["main_loads"] and "X:16B" not in shifted["main_loads"]
    assert shifted["aligned"] == ["Y"] and shifted["narrow"] == []
