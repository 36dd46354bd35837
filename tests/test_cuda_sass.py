"""Offline proof (no GPU needed) that the built CUDA kernels are the streaming ones.

Disassembles the built extension with the cuobjdump that ships inside Triton
(triton/backends/nvidia/bin) and checks, for every architecture it was built for:
  * the apply (forward), sums and dx (backward) tile kernels and the statistics kernel move
    x, dy, y and dx with 128-bit global accesses (LDG.E.128 / STG.E.128) in fp32 and bf16;
  * no kernel uses local memory or a stack (no register spills), and each stays within the
    registers its __launch_bounds__ promise (the tile planner counts on that occupancy).
Prints every kernel's register count.  Skipped when the extension was built without CUDA.
"""

import collections
import os
import re
import subprocess

import pytest

from fused_poolformer import ops

pytestmark = pytest.mark.skipif(not ops.HAS_CUDA_KERNELS, reason="extension built without CUDA kernels")

SCALARS = {"f": "float32", "d": "float64", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}
MODES = {"0": "apply", "1": "sums", "2": "dx"}
# Blocks of 256 threads per multiprocessor the launch bounds promise (plan.h kTileBlocksPerSM).
BLOCKS_PER_SM = {"float32": 4, "float64": 4, "float16": 3, "bfloat16": 3}
LDG_128 = re.compile(r"\bLDG\.E(?:\.\w+)*\.128\b")
STG_128 = re.compile(r"\bSTG\.E(?:\.\w+)*\.128\b")


def cuobjdump():
    triton = pytest.importorskip("triton")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        pytest.skip("no cuobjdump in the triton package")
    return path


def library():
    from fused_poolformer import _C

    return _C.__file__


def run(*args):
    return subprocess.run([cuobjdump(), *args, library()], capture_output=True, text=True, check=True).stdout


def describe(mangled):
    """('tile', dtype, radius, mode) / ('stats', dtype) / ('fold', dtype), or None.  (The
    tile kernels serve both layouts.)"""
    scalar = "|".join(re.escape(s) for s in SCALARS)
    m = re.search(rf"11tile_kernelI({scalar})[fd]Lb([01])ELi([012])E", mangled)
    if m:
        return ("tile", SCALARS[m[1]], "pool3" if m[2] == "1" else "any-pool", MODES[m[3]])
    m = re.search(rf"(12stats_kernel|11fold_kernel)I({scalar})[fd]E", mangled)
    if m:
        return ("stats" if "stats" in m[1] else "fold", SCALARS[m[2]])
    return None


@pytest.fixture(scope="module")
def architectures():
    archs = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", run("-lelf"))))
    assert archs, "the extension has CUDA kernels registered but no SASS for any architecture"
    return archs


def sass_by_kernel(arch):
    text = run("-sass", "-arch", arch)
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    kernels = collections.defaultdict(str)
    for name, body in zip(parts[1::2], parts[2::2]):
        kernels[name] += body
    return kernels


def resource_usage(arch):
    text = run("-res-usage", "-arch", arch)
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    return usage


def test_streaming_kernels_use_128_bit_global_accesses(architectures):
    for arch in architectures:
        kernels = {describe(name): body for name, body in sass_by_kernel(arch).items() if describe(name)}
        checked = 0
        for key, body in sorted(kernels.items()):
            if key[1] not in ("float32", "bfloat16") or key[0] == "fold":
                continue
            loads, stores = len(LDG_128.findall(body)), len(STG_128.findall(body))
            print(f"{arch} {' '.join(key)}: {loads} LDG.E.128, {stores} STG.E.128")
            assert loads > 0, f"{arch} {key}: no 128-bit global load"
            if key[0] == "tile" and key[-1] != "sums":  # the kernels that write y and dx
                assert stores > 0, f"{arch} {key}: no 128-bit global store"
            checked += 1
        # 2 dtypes x (2 radius variants x 3 modes + statistics)
        assert checked == 2 * (2 * 3 + 1), f"{arch}: found {checked} of the 14 kernels"


def test_no_local_memory_and_registers_within_launch_bounds(architectures):
    for arch in architectures:
        usage = resource_usage(arch)
        described = {name: describe(name) for name in usage}
        # 4 dtypes x (2 radius variants x 3 modes + statistics + folds)
        assert sum(d is not None for d in described.values()) == 4 * (2 * 3 + 2), sorted(described.values(), key=str)
        for name, u in sorted(usage.items(), key=lambda item: str(described[item[0]])):
            key = described[name] or (name,)
            print(f"{arch} {' '.join(key)}: {u['REG']} registers, stack {u['STACK']}, local {u['LOCAL']}")
            assert u["STACK"] == 0 and u["LOCAL"] == 0, f"{arch} {key}: spills to local memory {u}"
            if key[0] == "tile":
                assert u["REG"] * 256 * BLOCKS_PER_SM[key[1]] <= 65536, f"{arch} {key}: {u['REG']} registers"
