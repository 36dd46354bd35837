"""Runs the CUDA kernels on the CPU: builds tests/cuda_emulator.cpp (the kernels of
csrc/cuda compiled against the emulator of csrc/cuda/simt.h) with the host C++ compiler and
calls it through ctypes with CPU tensors.

The build is cached under build/cuda_emulator/<hash of the sources and flags>, so only the
first run after a change of csrc/cuda pays for it (about a minute on two cores).
"""

import ctypes
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sysconfig

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "tests", "cuda_emulator.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
FLAGS = ["-O2", "-std=c++20", "-fPIC", "-g0", "-fno-strict-aliasing"]
# An H200 as the planner sees it; tests pass others to force small tiles.
H200 = dict(multiprocessors=132, shared_bytes_optin=227 * 1024)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class EmuCall(ctypes.Structure):
    """Mirror of FpmEmuCall in tests/cuda_emulator.cpp."""

    _fields_ = [
        ("dtype", _i64), ("N", _i64), ("C", _i64), ("H", _i64), ("W", _i64), ("G", _i64),
        ("pool_size", _i64), ("channels_last", _i64), ("eps", ctypes.c_double),
        ("x", _ptr), ("y", _ptr), ("mean", _ptr), ("rstd", _ptr), ("grad_y", _ptr), ("grad_x", _ptr),
        ("param_data", _ptr * 4), ("param_stride", _i64 * 4), ("param_is_float", _i64 * 4),
        ("param_bytes", _i64 * 4),
        ("grad_data", _ptr * 4), ("grad_is_float", _i64 * 4), ("grad_bytes", _i64 * 4),
        ("multiprocessors", _i64), ("shared_bytes_optin", _i64), ("schedule", _i64), ("seed", _i64),
        ("launches", _i64), ("allocations", _i64), ("workspace_bytes", _i64),
        ("wide_loads", _i64), ("narrow_loads", _i64), ("wide_stores", _i64), ("narrow_stores", _i64),
    ]


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _sources():
    paths = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")))
    paths += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))
    return paths + [os.path.join(ROOT, "csrc", "pool_mixer.h"), SHIM]


def build():
    """Path of the compiled emulator library, building it if the sources changed."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    digest = hashlib.sha256()
    for path in _sources():
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    digest.update(" ".join([cxx, torch_include, torch.__version__] + FLAGS).encode())
    out_dir = os.path.join(ROOT, "build", "cuda_emulator", digest.hexdigest()[:16])
    lib = os.path.join(out_dir, "emulator" + (sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"))
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several test processes start at once
        if os.path.exists(lib):
            return lib
        base = [cxx] + FLAGS + ["-I", os.path.join(ROOT, "csrc"), "-I", torch_include]
        objects, procs = [], []
        for code in DTYPE_CODES.values():  # one translation unit per dtype, compiled in parallel
            obj = os.path.join(out_dir, f"dtype{code}.o")
            procs.append(subprocess.Popen(base + [f"-DFPM_EMU_DTYPE={code}", "-c", SHIM, "-o", obj],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            objects.append(obj)
        for proc in procs:
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError("building the CUDA emulator failed:\n" + output)
        tmp = lib + ".tmp"
        subprocess.run([cxx, "-shared", "-o", tmp] + objects, check=True)
        os.replace(tmp, lib)
    return lib


_LIBRARY = None


def library():
    global _LIBRARY
    if _LIBRARY is None:
        lib = ctypes.CDLL(build())
        for code in DTYPE_CODES.values():
            for name in (f"fpm_emu_forward_{code}", f"fpm_emu_backward_{code}"):
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.POINTER(EmuCall), ctypes.c_char_p, _i64]
                fn.restype = ctypes.c_int
            plan = getattr(lib, f"fpm_emu_plan_{code}")
            plan.argtypes = [ctypes.POINTER(EmuCall), _i64, ctypes.POINTER(_i64), ctypes.c_char_p, _i64]
            plan.restype = ctypes.c_int
        _LIBRARY = lib
    return _LIBRARY


class EmulatorError(RuntimeError):
    pass


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels_last_layout(x):
    """The layout host.cpp hands the kernels: channels_last when dense only in that format."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _nan_like(x):
    return torch.full_like(x, float("nan"))


def _bytes(t):
    return 0 if t is None else t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def _call(x, kw, num_groups, pool_size, eps, schedule, seed, device):
    n, c, h, w = x.shape
    call = EmuCall()
    call.dtype = DTYPE_CODES[x.dtype]
    call.N, call.C, call.H, call.W, call.G = n, c, h, w, num_groups
    call.pool_size, call.eps = pool_size, eps
    call.channels_last = int(channels_last_layout(x))
    call.x = x.data_ptr()
    for i, name in enumerate(("weight", "layer_scale", "res_scale", "sample_scale")):
        t = kw.get(name)
        if t is not None:
            call.param_data[i] = t.data_ptr()
            call.param_stride[i] = t.stride(0)
            call.param_is_float[i] = int(t.dtype == torch.float32)
            call.param_bytes[i] = _bytes(t)
    call.multiprocessors = device["multiprocessors"]
    call.shared_bytes_optin = device["shared_bytes_optin"]
    call.schedule, call.seed = schedule, seed
    return call


def _run(fn, call, keep_alive):
    error = ctypes.create_string_buffer(4096)
    rc = fn(ctypes.byref(call), error, len(error))
    del keep_alive
    if rc != 0:
        raise EmulatorError(error.value.decode())


def _check_dense(t, name):
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name} must be dense (the operator's host prologue makes it so)")


def forward(x, kw, num_groups=1, pool_size=3, eps=1e-5, schedule=0, seed=1, device=H200):
    """y, mean, rstd and the call's counters (launches, allocations, accesses) from the
    emulated CUDA forward.  x: a dense CPU tensor (NCHW or channels_last)."""
    _check_dense(x, "x")
    call = _call(x, kw, num_groups, pool_size, eps, schedule, seed, device)
    y = _nan_like(x)
    mean = torch.full((x.shape[0], num_groups), float("nan"), dtype=stats_dtype(x.dtype))
    rstd = torch.full_like(mean, float("nan"))
    call.y, call.mean, call.rstd = y.data_ptr(), mean.data_ptr(), rstd.data_ptr()
    _run(getattr(library(), f"fpm_emu_forward_{call.dtype}"), call, (x, y, mean, rstd, kw))
    return y, mean, rstd, counters(call)


GRAD_NAMES = ("weight", "bias", "layer_scale", "res_scale")


def backward(grad_y, x, mean, rstd, kw, num_groups=1, pool_size=3, eps=1e-5, want_grad_x=True,
             want=GRAD_NAMES, schedule=0, seed=1, device=H200):
    """(grad_x or None, {name: gradient} for the names in `want`, counters) from the emulated
    CUDA backward.  Gradients take their parameter's dtype, or x's when it is absent."""
    _check_dense(x, "x")
    _check_dense(grad_y, "grad_y")
    call = _call(x, kw, num_groups, pool_size, eps, schedule, seed, device)
    call.grad_y, call.mean, call.rstd = grad_y.data_ptr(), mean.data_ptr(), rstd.data_ptr()
    grad_x = _nan_like(x) if want_grad_x else None
    if grad_x is not None:
        call.grad_x = grad_x.data_ptr()
    grads = {}
    for i, name in enumerate(GRAD_NAMES):
        if name in want:
            dtype = kw[name].dtype if kw.get(name) is not None else x.dtype
            g = torch.full((x.shape[1],), float("nan"), dtype=dtype)
            grads[name] = g
            call.grad_data[i] = g.data_ptr()
            call.grad_is_float[i] = int(dtype == torch.float32)
            call.grad_bytes[i] = _bytes(g)
    _run(getattr(library(), f"fpm_emu_backward_{call.dtype}"), call, (x, grad_y, mean, rstd, kw, grad_x, grads))
    return grad_x, grads, counters(call)


TILE_PLAN_FIELDS = ("TC", "TH", "TW", "halo_rows", "halo_cols", "blocks", "smem_bytes", "staged_bytes",
                    "stage_vectorized", "store_vectorized", "stage_kind")
STATS_PLAN_FIELDS = ("chunk", "blocks_per_group", "blocks", "vectorized")


def plan(shape, dtype, channels_last, mode, num_groups=1, pool_size=3, device=H200):
    """The launch geometry the CUDA launcher picks for a shape: mode "apply", "sums", "dx"
    (tile kernels) or "stats".  No tensors are touched."""
    n, c, h, w = shape
    call = EmuCall()
    call.dtype = DTYPE_CODES[dtype]
    call.N, call.C, call.H, call.W, call.G = n, c, h, w, num_groups
    call.pool_size, call.channels_last = pool_size, int(channels_last)
    call.multiprocessors = device["multiprocessors"]
    call.shared_bytes_optin = device["shared_bytes_optin"]
    code = {"apply": 0, "sums": 1, "dx": 2, "stats": 3}[mode]
    out = (_i64 * 16)()
    error = ctypes.create_string_buffer(4096)
    if getattr(library(), f"fpm_emu_plan_{call.dtype}")(ctypes.byref(call), code, out, error, len(error)) != 0:
        raise EmulatorError(error.value.decode())
    fields = STATS_PLAN_FIELDS if mode == "stats" else TILE_PLAN_FIELDS
    return dict(zip(fields, out[:len(fields)]))


def counters(call):
    return {name: getattr(call, name) for name in ("launches", "allocations", "workspace_bytes", "wide_loads",
                                                   "narrow_loads", "wide_stores", "narrow_stores")}
