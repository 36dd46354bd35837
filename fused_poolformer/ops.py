"""The public entry points ``pool_mixer`` and ``poolformer_block``, and the choice of backend.

The operators live elsewhere: the C++ CPU and CUDA operators in ``fused_poolformer._C``
(schemas, host prologue and autograd in C++, see ``csrc/``), the Triton operators in
``fused_poolformer.triton``; their fake kernels and the argument rules in
``fused_poolformer.contract``.  This module only picks one and calls it: for the C++
backends, one call into C++ per direction, which checks the arguments itself.
"""

import re
from typing import List, Optional

import torch
from torch import Tensor

from . import backends as _backends
from . import block_contract, contract
from .backends import EXTENSION_ERROR, HAS_CPU_KERNELS, HAS_CUDA_KERNELS, triton_available, triton_interpreted

# The built-in backend names (``backends.names()`` also lists any registered later).
BACKENDS = _backends.names()

if EXTENSION_ERROR is None:
    from . import _C

    CPP_FORWARD, CPP_BACKWARD = _backends.get("cpu").operators()
else:
    CPP_FORWARD = CPP_BACKWARD = None


def available_backends(device: str = "cpu") -> List[str]:
    """Backends that can serve tensors on ``device`` ("cpu" or "cuda") in this process."""
    return _backends.available_backends(device)


def choose_backend(backend: str, x: Tensor) -> str:
    """The name of the backend that will serve ``x``; a clear error where the requested
    one cannot."""
    return _backends.choose(backend, x).name


def forward_operator(backend: str):
    """The forward operator of a fused backend."""
    return _backends.get(backend).operators()[0]


def backward_operator(backend: str):
    """The backward operator of a fused backend."""
    return _backends.get(backend).operators()[1]


def triton_operators():
    """The Triton (forward, backward) operators, or None where Triton cannot be imported."""
    return _backends.get("triton").operators() if triton_available() else None


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
    is AvgPool2d(**contract.pool_arguments(pool_size)): stride 1, "same" padding, the
    average over the valid taps.
    ``backend`` is "auto", "cpu", "cuda", "triton", "reference" or one registered with
    ``fused_poolformer.backends.register_backend``.  Bad arguments raise
    ValueError / TypeError naming the argument.
    """
    # The common case first, with as little Python as possible: the C++ operator checks
    # every tensor argument and value itself; only what Python alone can see (a bool passed
    # as an int, a string for a number) is checked here.
    if (
        isinstance(x, Tensor)
        and ((x.is_cpu and _backends.HAS_CPU_KERNELS and backend in _CPU_FAST)
             or (x.is_cuda and _backends.HAS_CUDA_KERNELS and backend in _CUDA_FAST))
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
    impl = _backends.choose(backend, x)
    if impl.checks_in_python:
        # No C++ prologue behind it: check here (a Triton operator checks again when called
        # directly; that costs microseconds next to its launches).
        contract.check_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    else:
        contract.check_options(x, num_groups, pool_size, eps)
    forward = impl.operators()[0]
    if forward is CPP_FORWARD:
        return _call_cpp_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size,
                                 float(eps))
    return forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, float(eps))[0]


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


# ---------------------------------------------------------------------------------------
# The whole block.


def _matrix(w):
    """A 1x1 convolution's (out, in, 1, 1) weight as the operator's (out, in) matrix (a view)."""
    if isinstance(w, Tensor) and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
        return w.flatten(1)
    return w


def poolformer_block(
    x: Tensor,
    *,
    norm1_weight: Optional[Tensor] = None,
    norm1_bias: Optional[Tensor] = None,
    layer_scale1: Optional[Tensor] = None,
    res_scale1: Optional[Tensor] = None,
    sample_scale1: Optional[Tensor] = None,
    num_groups1: int = 1,
    pool_size: int = 3,
    eps1: float = 1e-5,
    norm2_weight: Optional[Tensor] = None,
    norm2_bias: Optional[Tensor] = None,
    eps2: float = 1e-5,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor] = None,
    layer_scale2: Optional[Tensor] = None,
    res_scale2: Optional[Tensor] = None,
    sample_scale2: Optional[Tensor] = None,
    activation: str = "gelu",
    act_scale: Optional[Tensor] = None,
    act_bias: Optional[Tensor] = None,
    gemm_dtype: Optional[torch.dtype] = None,
    save_hidden: bool = True,
    backend: str = "auto",
) -> Tensor:
    """A whole PoolFormer / MetaFormer pooling block in one operator pair (docs/block.md):

        x1  = pool_mixer(x, norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1)
        out = res_scale2 * x1 + layer_scale2 * sample_scale2 * fc2(act(fc1(GroupNorm(1)(x1))))

    equal (to rounding) to :func:`fused_poolformer.reference.poolformer_block`.  ``fc1_weight``
    is (hidden, C) (or a 1x1 convolution's (hidden, C, 1, 1)), ``fc2_weight`` (C, hidden);
    ``activation`` is "gelu", "gelu_tanh" or "star_relu" (with (1,) ``act_scale`` /
    ``act_bias``).  ``gemm_dtype``: the dtype fc1, the activation and fc2 run in (None: x's,
    or the autocast dtype inside an autocast region); statistics and epilogues accumulate
    in float32.  ``save_hidden=False`` saves only x and the (N, .) statistics for the
    backward, which then runs fc1 once more (``recompute="mlp"`` in the modules).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"poolformer_block: x must be a Tensor, got {type(x).__name__}")
    impl = _backends.choose(backend, x, who="poolformer_block", family="block")
    device_type = x.device.type
    if gemm_dtype is None and x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        gemm_dtype = torch.get_autocast_dtype(device_type)
    arguments = (norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1, pool_size, eps1,
                 norm2_weight, norm2_bias, eps2, _matrix(fc1_weight), fc1_bias, _matrix(fc2_weight), fc2_bias,
                 layer_scale2, res_scale2, sample_scale2, activation, act_scale, act_bias, gemm_dtype)
    if impl.checks_in_python:
        block_contract.check_forward(x, *arguments)
    else:
        block_contract.check_scalars(*arguments)
    forward = impl.operators("block")[0]
    with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _no_context():
        return forward(x, *arguments, bool(save_hidden))[0]


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
