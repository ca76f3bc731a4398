"""The harness compiles kernels for sm_80/sm_90 without a GPU and reports what does not compile."""

import pytest

from tests.compile_harness import SHARED_LIMIT, KernelSpec, assert_compiles, autotune_specs, compile_specs

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
