"""GPU cases for the streaming CUDA kernels that the property tests (test_correctness.py) do not cover: data that
starts off a 16-byte boundary (partial vector slots at every run end), every odd pool size on
shapes that cross tiles, channels_last with several groups (strided statistics runs), and the
later PoolFormer stages, whose tiles hold several whole planes (NCHW) or 128-byte channel
vectors (channels_last).  The same cases run without a GPU in tests/test_cuda_emulated.py.
"""

import pytest
import torch

from fused_poolformer import ops
from helpers import check_forward_backward, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    pytest.mark.skipif(not ops.HAS_CUDA_KERNELS, reason="extension built without CUDA kernels"),
]


def cuda_inputs(shape, dtype, channels_last, seed):
    return make_inputs(shape, dtype, channels_last, seed=seed, device="cuda")


def check_against_reference_and_cpu(x, kw, dtype, **opts):
    """Forward and every gradient vs the float64 reference and vs the CPU kernels."""
    assert x.dtype == dtype
    check_forward_backward("cuda", x, kw, **opts)


def off_boundary(t, elements):
    """A copy of t (same layout) whose data starts `elements` past a 16-byte boundary."""
    buffer = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    out = buffer[elements:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("offset", [1, 3])
def test_data_off_a_16_byte_boundary(offset, channels_last, dtype):
    x, kw = cuda_inputs((2, 24, 14, 13), dtype, channels_last, seed=offset)
    check_against_reference_and_cpu(off_boundary(x, offset), kw, dtype, num_groups=2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("pool_size", [1, 3, 5, 7, 9])
def test_pool_sizes_across_tiles(pool_size, channels_last):
    x, kw = cuda_inputs((3, 40, 61, 67), torch.float32, channels_last, seed=pool_size)
    check_against_reference_and_cpu(x, kw, torch.float32, num_groups=4, pool_size=pool_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_groups", [2, 8])
def test_channels_last_groups(num_groups, dtype):
    x, kw = cuda_inputs((2, 64, 15, 17), dtype, True, seed=num_groups)
    check_against_reference_and_cpu(x, kw, dtype, num_groups=num_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 128, 28, 28), (2, 320, 14, 14), (2, 512, 7, 7)], ids=str)
def test_later_stages(shape, channels_last, dtype):
    x, kw = cuda_inputs(shape, dtype, channels_last, seed=shape[1])
    check_against_reference_and_cpu(x, kw, dtype)
