"""AOTInductor deployment of a converted model (issue 21; docs/deploy.md): ``torch.export`` of
the model, ``aoti_compile_and_package`` into a ``.pt2``, and the package run

- from a fresh Python process that imports only torch and fused_poolformer, and
- from C++ without Python: examples/aoti_cpp, built by CMake against the operator library of
  scripts/cmake_build.sh,

each checked against the model's eager output.  One package per converter (fusion level),
exported with a dynamic batch and run at the exported batch and at another one."""

import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from typing import Callable, List

import numpy as np
import pytest
import torch
from torch import nn

from helpers import HAS_CUDA_DEVICE, ROOT

import fused_poolformer

timm_metaformer = pytest.importorskip("timm.models.metaformer")
timm_layers = pytest.importorskip("timm.layers")

# The fusion levels a package is built from: each converts an unfused model, and every test
# runs on each.  "block" (convert_model's default) fuses the v1 stage with GroupNorm(1) and
# both v2 stages whole (the block operator) and the GroupNorm(4) stage at the mixer level;
# "mixer" fuses every token mixer alone.
CONVERTERS = [pytest.param(functools.partial(fused_poolformer.convert_model, fuse=fuse), id=fuse)
              for fuse in ("block", "mixer")]
EXPORT_BATCH, OTHER_BATCH = 2, 3
IMAGE_SIZE = 64
# Errors relative to the largest |eager output|.  The package runs Inductor's kernels for
# everything around the fused operator (other summation orders: ~2e-7 measured on the CPU);
# the C++ program runs the very same package as Python does.
PACKAGE_VS_EAGER = 1e-5
CUDA_PACKAGE_VS_EAGER = 1e-4
CPP_VS_PYTHON = 1e-6

# Runs in a fresh interpreter: argv = package, inputs (torch.save'd list), outputs path, device.
FRESH_PYTHON = """
import sys
import torch
import fused_poolformer  # registers the operators the package calls through the dispatcher

package, inputs, outputs, device = sys.argv[1:5]
torch.backends.cudnn.allow_tf32 = False  # as the eager run in the test process
runner = torch._inductor.aoti_load_package(package)
with torch.no_grad():
    results = [runner(x.to(device)).cpu() for x in torch.load(inputs)]
torch.save(results, outputs)
# The package must not need the model's Python code.
leaked = [name for name in ("timm", "helpers") if name in sys.modules]
assert not leaked, f"loading the package imported {leaked}"
"""


def small_poolformer() -> nn.Module:
    """A PoolFormer of depth 1 per stage, built with timm's classes: two PoolFormer-v1 stages
    (GroupNorm with bias, layer scale; the second with 4 groups and a 5x5 pool), then two v2
    stages (GroupNorm1NoBias, res scale), so one package holds the operator in each of those
    settings.  Every per-channel vector is drawn at random (not layer scale's 1e-5), so each
    input of the fused operator shows in the output.  At 64x64 its package compiles in 12-30 s
    on the 2-core CI machine (load, Inductor's cache); poolformer_s12's takes 35-40 s and holds
    only the first setting."""
    generator = torch.Generator().manual_seed(0)
    model = timm_metaformer.MetaFormer(
        depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10,
        norm_layers=(timm_layers.GroupNorm1, functools.partial(nn.GroupNorm, 4),
                     timm_metaformer.GroupNorm1NoBias, timm_metaformer.GroupNorm1NoBias),
        layer_scale_init_values=(1e-5, 1e-5, None, None), res_scale_init_values=(None, None, 1.0, 1.0),
        downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, use_mlp_head=False)
    # convert_model recognises timm's Pooling by class name: widen the second one's window in place.
    model.stages[1].blocks[0].token_mixer.pool = nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model.eval()


@dataclasses.dataclass
class Package:
    path: str
    device: str
    inputs: List[torch.Tensor]  # on the CPU, batch EXPORT_BATCH then OTHER_BATCH
    eager: List[torch.Tensor]  # the converted model's eager outputs, on the CPU


def fused_operator_calls(program: torch.export.ExportedProgram) -> int:
    return sum(1 for node in program.graph.nodes
               if node.op == "call_function" and getattr(node.target, "namespace", None) == "fused_poolformer")


def compile_package(convert: Callable[[nn.Module], nn.Module], device: str, directory) -> Package:
    """Converts the small model, exports it with a dynamic batch and compiles the package."""
    model = convert(small_poolformer()).to(device)
    converted = model.fused_poolformer_report.converted
    assert len(converted) == 4, model.fused_poolformer_report
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for batch in (EXPORT_BATCH, OTHER_BATCH)]
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (inputs[0].to(device),), dynamic_shapes={"x": {0: batch}})
    # One operator call per fused block: the export kept the fused path, it did not decompose it.
    assert fused_operator_calls(program) == len(converted), program.graph
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(directory / "model.pt2"))
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        eager = [model(x.to(device)).cpu() for x in inputs]
    return Package(path, device, inputs, eager)


def run_in_fresh_python(package: Package, directory) -> List[torch.Tensor]:
    inputs, outputs = directory / "inputs.pt", directory / "outputs.pt"
    torch.save(package.inputs, inputs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", FRESH_PYTHON, package.path, str(inputs), str(outputs), package.device],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(outputs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_outputs_match(actual, expected, tolerance):
    errors = [relative_error(a, e) for a, e in zip(actual, expected, strict=True)]
    assert max(errors) <= tolerance, f"max |error| / max |expected| per batch: {errors}"


@pytest.fixture(scope="module", params=CONVERTERS)
def cpu_package(request, tmp_path_factory) -> Package:
    return compile_package(request.param, "cpu", tmp_path_factory.mktemp("aoti-cpu"))


@pytest.fixture(scope="module")
def fresh_python_outputs(cpu_package, tmp_path_factory) -> List[torch.Tensor]:
    return run_in_fresh_python(cpu_package, tmp_path_factory.mktemp("aoti-python"))


def test_package_in_fresh_python_matches_eager(cpu_package, fresh_python_outputs):
    assert_outputs_match(fresh_python_outputs, cpu_package.eager, PACKAGE_VS_EAGER)


def test_package_without_the_operators_fails_naming_them(cpu_package):
    """The package calls the operators through the dispatcher: a process that has not
    registered them cannot load it, and the error names the operator."""
    load = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", load, cpu_package.path], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Could not find schema for fused_poolformer::" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_DEVICE, reason="no CUDA device")
@pytest.mark.parametrize("convert", CONVERTERS)
def test_cuda_package_in_fresh_python_matches_eager(convert, tmp_path):
    package = compile_package(convert, "cuda", tmp_path)
    assert_outputs_match(run_in_fresh_python(package, tmp_path), package.eager, CUDA_PACKAGE_VS_EAGER)


# --- C++: examples/aoti_cpp against the CMake-built operator library -----------------------

def missing_cpp_toolchain():
    """Why the C++ example cannot be built here (None when it can)."""
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    return None


def cmake_build(build_dir, *cmake_args, source=None) -> None:
    """scripts/cmake_build.sh (which finds libtorch, the CUDA toolkit and nvrtc) on the
    operator library, or on the project in ``source``."""
    command = ["bash", os.path.join(ROOT, "scripts", "cmake_build.sh")]
    if source is not None:
        command += ["--source", source]
    proc = subprocess.run(command + [str(build_dir), *cmake_args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="session")
def ops_library(tmp_path_factory) -> str:
    """libfused_poolformer_ops.so, built once per session (the CPU kernels: 2-4 minutes on
    this 2-core machine), or the one $FUSED_POOLFORMER_OPS_LIBRARY names (e.g. a CUDA build)."""
    prebuilt = os.environ.get("FUSED_POOLFORMER_OPS_LIBRARY")
    if prebuilt:
        assert os.path.isfile(prebuilt), f"FUSED_POOLFORMER_OPS_LIBRARY={prebuilt} is not a file"
        return prebuilt
    reason = missing_cpp_toolchain()
    if reason is not None:
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("cmake-ops")
    cmake_build(build)
    return str(build / "libfused_poolformer_ops.so")


@pytest.fixture(scope="session")
def aoti_example(ops_library, tmp_path_factory) -> str:
    reason = missing_cpp_toolchain()
    if reason is not None:
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("aoti-example")
    cmake_build(build, f"-DFUSED_POOLFORMER_OPS_LIBRARY={ops_library}",
                source=os.path.join(ROOT, "examples", "aoti_cpp"))
    return str(build / "aoti_poolformer")


def run_example(executable: str, package: Package, x: torch.Tensor, directory) -> torch.Tensor:
    """The example on ``x`` (written raw, float32, as it reads it); its output read back."""
    inputs, outputs = directory / "x.bin", directory / "y.bin"
    x.numpy().astype(np.float32).tofile(inputs)
    proc = subprocess.run([executable, package.path, str(inputs), str(outputs), *map(str, x.shape)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.from_numpy(np.fromfile(outputs, dtype=np.float32))


def test_cpp_example_matches_python_and_eager(aoti_example, cpu_package, fresh_python_outputs, tmp_path):
    cpp_outputs = [run_example(aoti_example, cpu_package, x, tmp_path).reshape(expected.shape)
                   for x, expected in zip(cpu_package.inputs, cpu_package.eager, strict=True)]
    assert_outputs_match(cpp_outputs, fresh_python_outputs, CPP_VS_PYTHON)
    assert_outputs_match(cpp_outputs, cpu_package.eager, PACKAGE_VS_EAGER)
