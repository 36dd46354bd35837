"""Compile every Triton kernel of the backend ahead of time for a GPU this machine may not
have, and report what the machine code does: registers, spills, and vector global loads and
stores.

    python -m fused_poolformer.triton.aot [--arch 90] [--quick] [--json]

The kernels are specialised exactly as a launch would specialise them: the host functions
build the launches (``forward_launches`` / ``backward_launches``) for small CPU stand-in
tensors of each case, and Triton's own binder turns their arguments into the signature,
constants and alignment attributes that ``triton.compile`` gets.  Every autotuning
configuration is compiled.  ``ptxas -v`` (shipped with Triton) gives registers and spills;
``cuobjdump -sass`` the 128-bit accesses in the final machine code.

Run it without TRITON_INTERPRET=1: the interpreter replaces the kernels by Python.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

from .. import contract
from . import backward, forward
from .common import INTERPRET, TileGeometry

BIN_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Case:
    """One specialisation family: a layout, dtype, shape, groups and pool size."""

    shape: tuple
    dtype: torch.dtype
    channels_last: bool
    num_groups: int
    pool_size: int

    @property
    def name(self) -> str:
        layout = "cl" if self.channels_last else "nchw"
        dtype = str(self.dtype).replace("torch.", "")
        return f"{layout}-{dtype}-{'x'.join(map(str, self.shape))}-G{self.num_groups}-k{self.pool_size}"


@dataclass
class KernelReport:
    case: str
    kernel: str
    config: str
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    ptx_loads: Dict[str, int] = field(default_factory=dict)  # "v4.b32": count, "b32": count ...
    ptx_stores: Dict[str, int] = field(default_factory=dict)
    sass_ldg128: int = 0
    sass_stg128: int = 0
    sass_instructions: int = 0  # static count (the tile kernels have no loops but the fold's)

    def vector_loads(self) -> int:
        return sum(n for kind, n in self.ptx_loads.items() if kind.startswith("v"))

    def vector_stores(self) -> int:
        return sum(n for kind, n in self.ptx_stores.items() if kind.startswith("v"))


def cases(quick: bool = False) -> List[Case]:
    """The specialisations shipped: both layouts, float32 and bfloat16 (plus float16 and
    float64 in full mode), radius 1 (pool 3, the PoolFormer default) and radius 3 (pool 7),
    the first and third PoolFormer stage planes, G = 1 and G > 1."""
    out = []
    for channels_last in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            out.append(Case((4, 64, 56, 56), dtype, channels_last, 1, 3))
        out.append(Case((4, 64, 56, 56), torch.float32, channels_last, 1, 7))
        if not quick:
            out.append(Case((4, 320, 14, 14), torch.bfloat16, channels_last, 1, 3))
            out.append(Case((4, 64, 28, 28), torch.float16, channels_last, 4, 5))
            out.append(Case((4, 64, 28, 28), torch.float64, channels_last, 1, 3))
    return out


def _stand_ins(case: Case):
    """CPU tensors with the case's shapes, dtypes and layout (their data is never read)."""
    n, c, _, _ = case.shape
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = torch.empty(case.shape, dtype=case.dtype).contiguous(memory_format=fmt)
    vec = lambda m: torch.empty(m, dtype=case.dtype)  # noqa: E731
    params = dict(weight=vec(c), layer_scale=vec(c), res_scale=vec(c), sample_scale=vec(n))
    return x, params


def launches(case: Case):
    """(kernel, grid, kwargs) of the forward and the backward of one case, with every
    optional vector present and every gradient requested."""
    x, p = _stand_ins(case)
    geo = TileGeometry(case.shape, x.element_size(), case.channels_last, case.num_groups, case.pool_size)
    acc = contract.stats_dtype(case.dtype)
    mean = torch.empty((geo.N, geo.G), dtype=acc)
    rstd = torch.empty_like(mean)
    fwd = forward.forward_launches(x, torch.empty_like(x), mean, rstd,
                                   torch.empty(forward.workspace_numel(geo), dtype=acc), p["weight"],
                                   p["layer_scale"], p["res_scale"], p["sample_scale"], geo, 1e-5)
    grads = tuple(torch.empty(geo.C, dtype=case.dtype) for _ in range(4))
    bwd = backward.backward_launches(x, torch.empty_like(x), torch.empty_like(x), mean, rstd,
                                     torch.empty(backward.workspace_numel(geo), dtype=acc), p["weight"],
                                     p["layer_scale"], p["res_scale"], p["sample_scale"], grads, geo)
    return fwd + bwd


def _compile(kernel, kwargs, target: GPUTarget):
    """triton.compile of ``kernel`` as a launch with ``kwargs`` would specialise it."""
    backend = make_backend(target)
    options = {k: kwargs.pop(k) for k in _OPTION_NAMES if k in kwargs}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, _ = binder(**kwargs)
    compile_options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound_args, specialization,
                                                                       options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=compile_options.__dict__)


def _count_accesses(ptx: str, op: str) -> Dict[str, int]:
    """Global loads or stores of the PTX by width: {"v4.b32": 12, "b16": 3, ...}."""
    counts: Dict[str, int] = {}
    for match in re.finditer(rf"\b{op}\.global(?:\.[A-Za-z0-9_:]+)*?\.((?:v\d\.)?b\d+)\b", ptx):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def _machine_code_facts(ptx: str):
    """(registers, spill bytes, stack bytes, SASS 128-bit loads, stores) from ptxas and
    cuobjdump on the PTX."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        done = subprocess.run([os.path.join(BIN_DIR, "ptxas"), f"-arch={arch}", "-v", ptx_path, "-o", cubin],
                              capture_output=True, text=True, check=True)
        log = done.stdout + done.stderr
        sass = subprocess.run([os.path.join(BIN_DIR, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?!NOP\b)[A-Z@]", sass, re.M))
    return (registers, int(spills.group(1)) + int(spills.group(2)), int(stack.group(1)),
            len(re.findall(r"\bLDG\.E\.(?:EL\.|LTC\w+\.)*128\b", sass)),
            len(re.findall(r"\bSTG\.E\.(?:EL\.|LTC\w+\.)*128\b", sass)), instructions)


def _kernel_name(kernel) -> str:
    return kernel.fn.__name__ if isinstance(kernel, Autotuner) else kernel.__name__


def compile_case(case: Case, target: GPUTarget, all_configs: bool = True) -> List[KernelReport]:
    """Compile every kernel of a case: each autotuning configuration that survives pruning
    for the case's shape (the first only, with all_configs=False)."""
    reports = []
    for kernel, _, kwargs in launches(case):
        if isinstance(kernel, Autotuner):
            configs = kernel.early_config_prune(kernel.configs, {}, **kwargs)
            configs = configs if all_configs else configs[:1]
            variants = [(kernel.fn, {**kwargs, **cfg.all_kwargs()}, str(cfg)) for cfg in configs]
        else:
            variants = [(kernel, dict(kwargs), f"num_warps: {kwargs.get('num_warps', 4)}")]
        for fn, kw, label in variants:
            compiled = _compile(fn, kw, target)
            ptx = compiled.asm["ptx"]
            regs, spills, stack, ldg128, stg128, instructions = _machine_code_facts(ptx)
            reports.append(KernelReport(
                case=case.name, kernel=_kernel_name(kernel), config=label, registers=regs, spill_bytes=spills,
                stack_bytes=stack, shared_bytes=int(getattr(compiled.metadata, "shared", 0)),
                ptx_loads=_count_accesses(ptx, "ld"), ptx_stores=_count_accesses(ptx, "st"),
                sass_ldg128=ldg128, sass_stg128=stg128, sass_instructions=instructions,
            ))
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90 (H100/H200)")
    parser.add_argument("--quick", action="store_true", help="fewer cases; the first autotuning config of "
                        "larger pools")
    parser.add_argument("--json", action="store_true", help="print one JSON object per kernel")
    args = parser.parse_args(argv)
    if INTERPRET:
        print("fused_poolformer.triton.aot: unset TRITON_INTERPRET (the interpreter has no machine code)",
              file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    for case in cases(args.quick):
        for r in compile_case(case, target, all_configs=not args.quick or case.pool_size == 3):
            if args.json:
                print(json.dumps(asdict(r)), flush=True)
            else:
                print(f"{r.case:34s} {r.kernel:20s} regs {r.registers:3d} spill {r.spill_bytes} "
                      f"smem {r.shared_bytes:5d} vld {r.vector_loads():3d} vst {r.vector_stores():3d} "
                      f"LDG.128 {r.sass_ldg128:3d} STG.128 {r.sass_stg128:3d} SASS {r.sass_instructions:5d}  "
                      f"{r.config}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
