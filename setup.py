"""Build of the `fused_poolformer._C` operator library.

Environment variables:
  FUSED_POOLFORMER_CUDA     "1" compiles the CUDA kernels (error if nvcc is missing), "0" skips
                            them; unset: compile them whenever nvcc is found, GPU or not.
  CUDA_HOME / CUDA_PATH     the CUDA toolkit root; unset: found from nvcc (see find_cuda_home).
  TORCH_CUDA_ARCH_LIST      CUDA architectures; with no GPU visible it defaults to "8.0;9.0".
  FUSED_POOLFORMER_NATIVE   "0" builds the CPU kernels without AVX2 (portable binaries).
  FUSED_POOLFORMER_PTXAS_VERBOSE  "1" passes -Xptxas -v (register/spill report).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_cudart(root):
    return bool(root) and any(
        glob.glob(os.path.join(root, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/*/lib")
    )


def find_cuda_home():
    """The toolkit root: $CUDA_HOME/$CUDA_PATH, else the TOP that `nvcc -dryrun` reports, else
    the first ancestor of nvcc's real path that holds libcudart.  The parent of the `nvcc` on
    PATH (torch's guess) can be a wrapper script's folder, which makes linking fail."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "x.cu"], capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match and _has_cudart(os.path.realpath(match.group(1))):
            return os.path.realpath(match.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    path = os.path.dirname(os.path.realpath(nvcc))
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if _has_cudart(path):
            return path
    return None


def want_cuda(cuda_home):
    flag = os.environ.get("FUSED_POOLFORMER_CUDA", "").strip()
    if flag == "0":
        return False
    nvcc_ok = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if flag == "1" and not nvcc_ok:
        sys.exit(
            "fused_poolformer: FUSED_POOLFORMER_CUDA=1 but no CUDA toolkit (nvcc + libcudart) was "
            "found; set CUDA_HOME to the toolkit root."
        )
    return nvcc_ok


CUDA_HOME = find_cuda_home()
WITH_CUDA = want_cuda(CUDA_HOME)
if WITH_CUDA:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension at import

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "fused_poolformer: building needs torch installed first "
        "(pip install torch, then pip install --no-build-isolation -e .)"
    )

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def _cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"\bavx2\b", f.read()) is not None
    except OSError:
        return False


def cpu_flags():
    flags = ["-O3", "-std=c++20", "-fno-math-errno"]
    if _cpu_has_avx2() and os.environ.get("FUSED_POOLFORMER_NATIVE", "1") != "0":
        # at::vec picks its AVX2 implementation from these macros (as ATen's own kernels do).
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def nvcc_flags():
    flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("FUSED_POOLFORMER_PTXAS_VERBOSE") == "1":
        flags += ["-Xptxas", "-v"]
    return flags


class Build(BuildExtension):
    """BuildExtension with a message that says what to do when the compile fails."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as exc:  # the compiler's own output is printed above this
            hint = (
                "CUDA compile failed: check CUDA_HOME (%s) and TORCH_CUDA_ARCH_LIST, or build "
                "without CUDA with FUSED_POOLFORMER_CUDA=0" % CUDA_HOME
                if WITH_CUDA
                else "C++ compile failed: a C++20 compiler (g++ >= 10) is required"
            )
            raise RuntimeError("fused_poolformer: %s (%s)" % (hint, exc)) from exc


def extension():
    # csrc/*.cpp: the Python module stub, the schemas, the host prologue and the autograd.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="fused_poolformer._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cpu_flags()},
    )
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags()
        return CUDAExtension(sources=sources, **kwargs)
    return CppExtension(sources=sources, **kwargs)


print(
    "fused_poolformer: CUDA kernels %s (CUDA_HOME=%s, TORCH_CUDA_ARCH_LIST=%s)"
    % ("ON" if WITH_CUDA else "OFF", CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST", "default"))
)

setup(
    packages=find_packages(include=["fused_poolformer", "fused_poolformer.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
