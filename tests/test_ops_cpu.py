"""The fused operator on the C++ CPU kernels against the unfused reference graph."""

import itertools

import pytest
import torch

import fused_poolformer as fp
from fused_poolformer import ops
from conftest import OPTION_NAMES, assert_close_to, call, make_inputs, opcheck_forward_and_backward, reference64

pytestmark = pytest.mark.skipif(not fp.HAS_CPU_KERNELS, reason="C++ extension not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(2, 8, 1, 1), (2, 4, 2, 3), (3, 8, 5, 7), (2, 12, 13, 9), (1, 16, 56, 56)]


def fused(x, kw, **opts):
    return call(fp.pool_mixer, x, kw, backend="cpu", **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, dtype, channels_last):
    x, kw = make_inputs(shape, dtype, channels_last, seed=hash(shape) % 1000)
    y = fused(x, kw, num_groups=2 if shape[1] % 2 == 0 else 1)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to(y, reference64(x, kw, num_groups=2 if shape[1] % 2 == 0 else 1), dtype)


@pytest.mark.parametrize("num_groups", [1, 2, 4])
@pytest.mark.parametrize("pool_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("channels_last", [False, True])
def test_groups_and_pool_sizes(num_groups, pool_size, channels_last):
    x, kw = make_inputs((2, 8, 6, 11), torch.float32, channels_last, seed=pool_size)
    assert_close_to(fused(x, kw, num_groups=num_groups, pool_size=pool_size),
                    reference64(x, kw, num_groups=num_groups, pool_size=pool_size), torch.float32)


@pytest.mark.parametrize("present", [c for r in range(6) for c in itertools.combinations(OPTION_NAMES, r)])
def test_every_option_combination(present):
    x, kw = make_inputs((2, 6, 5, 4), torch.float64, options=present, seed=len(present))
    assert_close_to(fused(x, kw, num_groups=3), reference64(x, kw, num_groups=3), torch.float64)


def test_float32_parameters_with_half_input():
    x, kw = make_inputs((2, 8, 7, 7), torch.bfloat16, param_dtype=torch.float32)
    assert_close_to(fused(x, kw), reference64(x, kw), torch.bfloat16)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("num_groups,pool_size,shape", [(1, 3, (2, 4, 5, 6)), (2, 5, (2, 4, 3, 7)), (4, 3, (1, 8, 4, 4))])
def test_gradcheck_float64(channels_last, num_groups, pool_size, shape):
    x, kw = make_inputs(shape, torch.float64, channels_last)
    leaves = [x] + [kw[k] for k in ("weight", "bias", "layer_scale", "res_scale")]
    for t in leaves:
        t.requires_grad_(True)

    def f(x, w, b, ls, rs):
        return fp.pool_mixer(x, w, b, layer_scale=ls, res_scale=rs, sample_scale=kw["sample_scale"],
                             num_groups=num_groups, pool_size=pool_size, backend="cpu")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


GRAD_NAMES = ("weight", "bias", "layer_scale", "res_scale")


def _gradients(fn, x, kw, dy):
    leaves = [x.detach().clone().requires_grad_()] + [kw[n].detach().clone().requires_grad_() for n in GRAD_NAMES]
    kw = dict(zip(GRAD_NAMES, leaves[1:]), sample_scale=kw["sample_scale"])
    y = call(fn, leaves[0], kw, num_groups=2)
    return torch.autograd.grad(y, leaves, dy.to(y.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_reference(dtype, channels_last):
    x, kw = make_inputs((2, 8, 9, 7), dtype, channels_last, seed=3)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = _gradients(lambda *a, **k: fp.pool_mixer(*a, backend="cpu", **k), x, kw, dy)
    kw64 = {k: v.double() for k, v in kw.items()}
    want = _gradients(fp.reference.pool_mixer, x.double(), kw64, dy)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close_to(g, w, dtype)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # the bias cancels out of y


def test_bias_gradient_is_exact_zeros():
    x, kw = make_inputs((2, 4, 5, 5), torch.float32)
    kw["bias"].requires_grad_(True)
    fused(x, kw).sum().backward()
    assert kw["bias"].grad is not None and torch.equal(kw["bias"].grad, torch.zeros(4))


def test_sample_scale_gets_no_gradient():
    x, kw = make_inputs((3, 4, 5, 5), torch.float64)
    kw["sample_scale"].requires_grad_(True)
    x.requires_grad_(True)
    fused(x, kw).sum().backward()
    assert kw["sample_scale"].grad is None and x.grad is not None


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    opcheck_forward_and_backward(*make_inputs((2, 4, 5, 6), torch.float32, channels_last))


def test_saves_only_x_and_statistics():
    x, kw = make_inputs((2, 8, 6, 6), torch.float32)
    x.requires_grad_(True)
    big = []

    def pack(t):
        if t.numel() >= x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x, kw)
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_large_mean_float32():
    g = torch.Generator().manual_seed(11)
    x = (1e4 + torch.randn(2, 16, 14, 14, generator=g, dtype=torch.float64))
    _, kw = make_inputs(x.shape, torch.float32)
    y = fused(x.float(), kw)
    ref = reference64(x, kw)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
    # The mixer term alone (the part that cancels catastrophically if done naively).
    mix = y.double() - x * kw["res_scale"].double().view(1, -1, 1, 1)
    mix_ref = ref - x * kw["res_scale"].double().view(1, -1, 1, 1)
    assert ((mix - mix_ref).norm() / mix_ref.norm()).item() < 2e-3


@pytest.mark.parametrize("channels_last", [False, True])
def test_bitwise_repeatable_across_threads(channels_last):
    x, kw = make_inputs((1, 32, 28, 28), torch.float32, channels_last, seed=4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            xs = x.detach().clone().requires_grad_()
            w = kw["weight"].detach().clone().requires_grad_()
            y = fp.pool_mixer(xs, w, kw["bias"], layer_scale=kw["layer_scale"], backend="cpu")
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            results.append((y.detach(), xs.grad, w.grad))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_empty_batch():
    x, kw = make_inputs((0, 4, 5, 5), torch.float32, options=("weight", "layer_scale"))
    x.requires_grad_(True)
    y = fused(x, kw)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_dense_input_is_copied_and_correct():
    base, kw = make_inputs((2, 8, 10, 12), torch.float32)
    x = base[:, :, 1:9, ::2]  # neither NCHW- nor NHWC-dense
    assert_close_to(fused(x, kw), reference64(x, kw), torch.float32)


def test_torch_compile_fullgraph_matches_eager():
    x, kw = make_inputs((2, 8, 7, 7), torch.float32)

    def f(x, w, b, ls):
        return fp.pool_mixer(x, w, b, layer_scale=ls, backend="auto") * 2.0

    args = (x, kw["weight"], kw["bias"], kw["layer_scale"])
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)
    xs = x.clone().requires_grad_()
    compiled(xs, *args[1:]).sum().backward()
    xe = x.clone().requires_grad_()
    f(xe, *args[1:]).sum().backward()
    torch.testing.assert_close(xs.grad, xe.grad, rtol=0, atol=0)


def test_auto_picks_cpu_kernels():
    x, _ = make_inputs((1, 4, 3, 3))
    assert ops.choose_backend("auto", x) == "cpu"
    assert "cpu" in fp.available_backends("cpu")


# --------------------------------------------------------------------------------------
# Validation: every bad argument is a clear exception naming it.

BAD_CALLS = [
    (dict(x=torch.randn(4, 5, 5)), "x must be 4-D"),
    (dict(x=torch.randint(0, 5, (1, 4, 5, 5))), "x must be float32"),
    (dict(weight=torch.randn(3)), "weight must have shape"),
    (dict(bias=torch.randn(4, 1)), "bias must have shape"),
    (dict(layer_scale=torch.randn(5)), "layer_scale must have shape"),
    (dict(res_scale=torch.randn(2)), "res_scale must have shape"),
    (dict(sample_scale=torch.randn(3)), "sample_scale must have shape"),
    (dict(weight=torch.randn(4, dtype=torch.float64)), "weight has dtype"),
    (dict(num_groups=3), "num_groups"),
    (dict(num_groups=0), "num_groups"),
    (dict(pool_size=4), "pool_size"),
    (dict(pool_size=0), "pool_size"),
    (dict(pool_size=-3), "pool_size"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-1e-5), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(backend="nope"), "backend"),
    (dict(backend="cuda"), "backend='cuda'"),
]


@pytest.mark.parametrize("bad,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_validation_errors_name_the_argument(bad, message):
    args = dict(x=torch.randn(2, 4, 5, 5), weight=None, bias=None)
    args.update(bad)
    x, weight, bias = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message.replace("(", r"\(").replace("'", "'")):
        fp.pool_mixer(x, weight, bias, **args)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(4, 5, 5), None, None, None, None, None, 1, 3, 1e-5), "x must be 4-D"),
    ((torch.randn(1, 4, 5, 5), torch.randn(3), None, None, None, None, 1, 3, 1e-5), "weight must have shape"),
    ((torch.randn(1, 4, 5, 5), None, None, None, None, torch.randn(2), 1, 3, 1e-5), "sample_scale must have shape"),
    ((torch.randn(1, 4, 5, 5), None, None, None, None, None, 3, 3, 1e-5), "num_groups"),
    ((torch.randn(1, 4, 5, 5), None, None, None, None, None, 1, 2, 1e-5), "pool_size"),
    ((torch.randn(1, 4, 5, 5), None, None, None, None, None, 1, 3, 0.0), "eps"),
])
def test_cpp_op_validation(args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fused_poolformer.pool_mixer_forward(*args)


@pytest.mark.parametrize("pool_size", [3, 5, 9])
@pytest.mark.parametrize("shape", [(1, 256, 5, 9), (2, 512, 3, 7), (1, 96, 4, 23)])
def test_channels_last_column_tiles(shape, pool_size):
    """Wide channels_last rows are cut into column tiles with a horizontal halo."""
    x, kw = make_inputs(shape, torch.float64, channels_last=True, seed=pool_size)
    x.requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = fused(x, kw, num_groups=4, pool_size=pool_size)
    (gx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_(True)
    yr = call(fp.reference.pool_mixer, xr, kw, num_groups=4, pool_size=pool_size)
    (gr,) = torch.autograd.grad(yr, xr, dy)
    assert_close_to(y, yr, torch.float64)
    assert_close_to(gx, gr, torch.float64)
