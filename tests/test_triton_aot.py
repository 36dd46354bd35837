"""Every Triton kernel compiled ahead of time for sm_90 (H100/H200) on a machine without a
GPU: no spills, no stack, 128-bit global loads and stores in the apply and dx kernels.

``python -m fused_poolformer.triton.aot --json`` specialises each kernel exactly as a launch
would (the host's own launch arguments for stand-in tensors, Triton's own binder), compiles
every autotuning configuration that survives pruning, and reports what ptxas and cuobjdump
(shipped with Triton) say.  It runs in a subprocess because this test session runs the
kernels through the interpreter (TRITON_INTERPRET=1), which has no machine code.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
if not all(os.path.exists(os.path.join(BIN, tool)) for tool in ("ptxas", "cuobjdump")):
    pytest.skip("this Triton ships no ptxas/cuobjdump", allow_module_level=True)

KERNELS = {"_statistics_kernel", "_apply_kernel", "_sums_kernel", "_dx_kernel"}
VECTOR_BYTES = 16


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "fused_poolformer.triton.aot", "--quick", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    out = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"\n{'case':34s} {'kernel':20s} {'regs':>4s} {'LDG.128':>7s} {'STG.128':>7s}  configuration")
    for r in out:
        print(f"{r['case']:34s} {r['kernel']:20s} {r['registers']:4d} {r['sass_ldg128']:7d} {r['sass_stg128']:7d}  "
              f"{r['config']}")
    return out


def test_every_kernel_of_every_case_compiles(reports):
    cases = {r["case"] for r in reports}
    assert len(cases) >= 6, f"expected both layouts, two dtypes and two pool sizes, got {sorted(cases)}"
    for case in cases:
        compiled = {r["kernel"] for r in reports if r["case"] == case}
        assert compiled == KERNELS, f"{case}: compiled {sorted(compiled)}"


def test_no_spills_and_no_stack(reports):
    for r in reports:
        where = f"{r['case']} {r['kernel']} ({r['config']})"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert r["stack_bytes"] == 0, f"{where} uses {r['stack_bytes']} bytes of stack"


def _contiguous_extent_is_whole_vectors(case: str) -> bool:
    """Whether every row of the case's contiguous axis starts on a 16-byte boundary
    (NCHW: W; channels_last: the channels of a group), from the case name."""
    layout, dtype, shape, groups, _ = case.split("-")
    n, c, h, w = (int(v) for v in shape.split("x"))
    size = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}[dtype]
    extent = c // int(groups[1:]) if layout == "cl" else w
    return extent * size % VECTOR_BYTES == 0


def test_apply_and_dx_use_128_bit_loads_and_stores(reports):
    checked = 0
    for r in reports:
        if r["kernel"] not in ("_apply_kernel", "_dx_kernel") or not _contiguous_extent_is_whole_vectors(r["case"]):
            continue
        where = f"{r['case']} {r['kernel']} ({r['config']})"
        wide_loads = sum(n for kind, n in r["ptx_loads"].items() if kind.startswith("v4.b32") or kind == "v2.b64")
        assert wide_loads > 0, f"{where}: no 128-bit ld.global in the PTX ({r['ptx_loads']})"
        assert r["sass_ldg128"] > 0 and r["sass_stg128"] > 0, f"{where}: no LDG.E.128 / STG.E.128 in the SASS"
        checked += 1
    assert checked >= 8, "the cases with 16-byte rows should give several apply and dx kernels to check"


def test_statistics_and_sums_passes_stream_with_vectors(reports):
    for r in reports:
        if r["kernel"] in ("_statistics_kernel", "_sums_kernel") and _contiguous_extent_is_whole_vectors(r["case"]):
            vector_loads = sum(n for kind, n in r["ptx_loads"].items() if kind.startswith("v"))
            assert vector_loads > 0, f"{r['case']} {r['kernel']}: scalar loads only ({r['ptx_loads']})"
