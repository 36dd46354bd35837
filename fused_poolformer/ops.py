"""The public entry point ``pool_mixer`` and the choice of backend.

The operators live elsewhere: the C++ CPU and CUDA operators in ``fused_poolformer._C``
(schemas, host prologue and autograd in C++, see ``csrc/``), the Triton operators in
``fused_poolformer.triton``; their fake kernels and the argument rules in
``fused_poolformer.contract``.  This module only picks one and calls it: for the C++
backends, one call into C++ per direction, which checks the arguments itself.
"""

import re
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import contract, reference

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

try:
    from . import _C  # loading it registers torch.ops.fused_poolformer.*

    EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built, or built against another torch
    EXTENSION_ERROR = exc
    warnings.warn(
        f"fused_poolformer: the compiled operators failed to load ({exc}); the 'cpu' and 'cuda' "
        "backends are unavailable and backend='auto' falls back to the slow unfused graph. "
        "Rebuild against the installed torch: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )


def _has_kernel(dispatch_key: str) -> bool:
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_poolformer::pool_mixer_forward", dispatch_key)


# Decided once at import, so that torch.compile sees constants.
HAS_CPU_KERNELS = _has_kernel("CPU")
HAS_CUDA_KERNELS = _has_kernel("CUDA")

if EXTENSION_ERROR is None:
    contract.register_fake_kernels("fused_poolformer::pool_mixer_forward", "fused_poolformer::pool_mixer_backward")
    CPP_FORWARD = torch.ops.fused_poolformer.pool_mixer_forward.default
    CPP_BACKWARD = torch.ops.fused_poolformer.pool_mixer_backward.default


# ---------------------------------------------------------------------------------------
# Triton: imported on first use (it registers its operators when imported).  Cached in a
# plain dict: torch.compile ignores functools.lru_cache and would trace the body.

_TRITON: dict = {}


def triton_operators():
    """The Triton (forward, backward) operators, or None where Triton cannot be imported."""
    if "ops" not in _TRITON:
        try:
            from . import triton as triton_backend
        except ImportError as exc:
            _TRITON["ops"], _TRITON["error"] = None, exc
        else:
            _TRITON["ops"] = (triton_backend.forward_op, triton_backend.backward_op)
            _TRITON["interpreted"] = triton_backend.INTERPRETED
    return _TRITON["ops"]


def triton_available() -> bool:
    return triton_operators() is not None


def triton_interpreted() -> bool:
    """Whether the Triton kernels were defined under TRITON_INTERPRET=1 (so they run on CPU
    tensors); triton.jit reads the variable when the kernels are imported, not per call."""
    return triton_available() and _TRITON["interpreted"]


def available_backends(device: str = "cpu") -> list:
    """Backends that can serve tensors on ``device`` ("cpu" or "cuda") in this process."""
    dev = torch.device(device).type
    out = []
    if dev == "cpu" and HAS_CPU_KERNELS:
        out.append("cpu")
    if dev == "cuda" and HAS_CUDA_KERNELS:
        out.append("cuda")
    if triton_available() and (dev == "cuda" or triton_interpreted()):
        out.append("triton")
    out.append("reference")
    return out


def choose_backend(backend: str, x: Tensor) -> str:
    """The backend that will serve ``x``; a clear error where the requested one cannot."""
    dev = x.device.type
    if backend == "auto":
        if dev == "cpu" and HAS_CPU_KERNELS:
            return "cpu"
        if dev == "cuda" and HAS_CUDA_KERNELS:
            return "cuda"
        if dev == "cuda" and triton_available():
            return "triton"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"pool_mixer: backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda"):
        if dev != backend:
            raise ValueError(f"pool_mixer: backend={backend!r} cannot serve a tensor on {x.device}")
        if EXTENSION_ERROR is not None:
            raise RuntimeError(f"pool_mixer: backend={backend!r} is unavailable: the extension did not load "
                               f"({EXTENSION_ERROR})")
        if not (HAS_CPU_KERNELS if backend == "cpu" else HAS_CUDA_KERNELS):
            raise RuntimeError(f"pool_mixer: backend={backend!r} is unavailable: the extension was built without "
                               f"{backend.upper()} kernels")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"pool_mixer: backend='triton' is unavailable: triton cannot be imported "
                               f"({_TRITON.get('error')})")
        if dev == "cpu" and not triton_interpreted():
            raise ValueError(
                "pool_mixer: backend='triton' serves CPU tensors only when TRITON_INTERPRET=1 was set "
                "before fused_poolformer.triton was imported"
            )
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"pool_mixer: backend='triton' cannot serve a tensor on {x.device}")
    return backend


def forward_operator(backend: str):
    """The forward operator of a fused backend ("cpu", "cuda" or "triton")."""
    if backend in ("cpu", "cuda"):
        return CPP_FORWARD
    return triton_operators()[0]


def backward_operator(backend: str):
    """The backward operator of a fused backend ("cpu", "cuda" or "triton")."""
    if backend in ("cpu", "cuda"):
        return CPP_BACKWARD
    return triton_operators()[1]


# ---------------------------------------------------------------------------------------
# The public entry point.


# The backend names that the C++ operator serves directly for a tensor on that device.
_CPU_FAST = ("auto", "cpu")
_CUDA_FAST = ("auto", "cuda")


def pool_mixer(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    layer_scale: Optional[Tensor] = None,
    res_scale: Optional[Tensor] = None,
    sample_scale: Optional[Tensor] = None,
    num_groups: int = 1,
    pool_size: int = 3,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Fused PoolFormer token mixer with its residual:

        y = res_scale * x + layer_scale * sample_scale * (Pool(GroupNorm(x)) - GroupNorm(x))

    equal (to rounding) to :func:`fused_poolformer.reference.pool_mixer`.  ``x`` is
    (N, C, H, W) float32/float64/float16/bfloat16, NCHW or channels_last (y keeps the
    layout); ``weight``/``bias`` are the GroupNorm affine, ``layer_scale``/``res_scale`` are
    per-channel (C,) vectors, ``sample_scale`` a per-sample (N,) factor (drop path).  Pool
    is AvgPool2d(pool_size, stride=1, padding=pool_size//2, count_include_pad=False).
    ``backend`` is "auto", "cpu", "cuda", "triton" or "reference".  Bad arguments raise
    ValueError / TypeError naming the argument.
    """
    # The common case first, with as little Python as possible: the C++ operator checks
    # every tensor argument and value itself; only what Python alone can see (a bool passed
    # as an int, a string for a number) is checked here.
    if (
        isinstance(x, Tensor)
        and ((x.is_cpu and HAS_CPU_KERNELS and backend in _CPU_FAST)
             or (x.is_cuda and HAS_CUDA_KERNELS and backend in _CUDA_FAST))
        and type(num_groups) is int
        and type(pool_size) is int
        and type(eps) is float
    ):
        if not torch.compiler.is_compiling():  # torch.compile traces the operator instead
            y = _C.forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
            if y is not None:
                return y
        return _call_cpp_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    if not isinstance(x, Tensor):
        raise TypeError(f"pool_mixer: x must be a Tensor, got {type(x).__name__}")
    impl = choose_backend(backend, x)
    if impl == "reference" or impl == "triton":
        # Neither has a C++ prologue: check in Python (the Triton operators check again when
        # called directly; that costs microseconds next to their launches).
        contract.check_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
        if impl == "reference":
            return reference.pool_mixer(x, weight, bias, layer_scale=layer_scale, res_scale=res_scale,
                                        sample_scale=sample_scale, num_groups=num_groups, pool_size=pool_size,
                                        eps=eps)
        return triton_operators()[0](x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size,
                                     float(eps))[0]
    contract.check_options(x, num_groups, pool_size, eps)
    return _call_cpp_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, float(eps))


def _call_cpp_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps):
    """y of the C++ forward operator through torch.ops: what torch.compile traces, and what
    serves the calls ``_C.forward`` leaves to it (tensor subclasses, __torch_function__
    modes, arguments of the wrong type)."""
    try:
        return CPP_FORWARD(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)[0]
    except RuntimeError as exc:
        # torch's argument parser names the argument but raises RuntimeError for a wrong
        # type (a list for a tensor): make it the TypeError it is.
        name = re.search(r"Expected a value of type .* for argument '(\w+)'", str(exc))
        if name is None:
            raise
        raise TypeError(f"pool_mixer: {name.group(1)} must be a Tensor or None; {str(exc).splitlines()[0]}") from None
