"""The layout's promises: a backend is one registry record plus its own files, and the pool
rule is stated in one C++ and one Python place.

The fake backend below is what a new backend's author writes: operators with the contract's
signatures (here Python custom operators over the unfused graph), one ``register_backend``
call -- and nothing else in the package.  Every consumer (``pool_mixer``, the modules,
``convert_model``, the MAC counters, the test helpers) must then serve it.
"""

import os
import re

import pytest
import torch

from helpers import (ROOT, assert_close_to, backend_params, call, device_of, forward_backward, make_inputs,
                     random_like, reference_forward_backward, unavailable_reason)

import fused_poolformer
from fused_poolformer import backends, contract, flops, reference

FAKE = "python-test"


@torch.library.custom_op(f"fused_poolformer_test::{FAKE.replace('-', '_')}_forward", mutates_args=())
def fake_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 layer_scale: torch.Tensor | None, res_scale: torch.Tensor | None,
                 sample_scale: torch.Tensor | None, num_groups: int, pool_size: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = reference.pool_mixer(x, weight, bias, layer_scale=layer_scale, res_scale=res_scale,
                             sample_scale=sample_scale, num_groups=num_groups, pool_size=pool_size, eps=eps)
    groups = x.reshape(x.shape[0], num_groups, -1).to(contract.stats_dtype(x.dtype))
    mean = groups.mean(-1)
    rstd = (groups.var(-1, unbiased=False) + eps).rsqrt()
    return y.contiguous(memory_format=contract.dense_format(x)), mean, rstd


@torch.library.custom_op(f"fused_poolformer_test::{FAKE.replace('-', '_')}_backward", mutates_args=())
def fake_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None, layer_scale: torch.Tensor | None,
                  res_scale: torch.Tensor | None, sample_scale: torch.Tensor | None, num_groups: int,
                  pool_size: int, eps: float, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    # Autograd is off inside an operator's kernel: differentiate the unfused graph with torch.func.
    params = (weight, bias, layer_scale, res_scale)

    def y_of(x, *params):
        return reference.pool_mixer(x, *params[:2], layer_scale=params[2], res_scale=params[3],
                                    sample_scale=sample_scale, num_groups=num_groups, pool_size=pool_size, eps=eps)

    present = [p if p is not None else x.new_ones(x.shape[1]) for p in params]
    _, vjp = torch.func.vjp(y_of, x, *present)
    grads = vjp(grad_y)
    return tuple(g if wanted and (i == 0 or params[i - 1] is not None) else x.new_empty((0,))
                 for i, (g, wanted) in enumerate(zip(grads, output_mask)))


def _register_fake_backend():
    contract.register_fake_kernels(fake_forward._qualname, fake_backward._qualname)
    contract.register_autograd(fake_forward, fake_backward)
    return backends.register_backend(backends.Backend(
        name=FAKE, devices=("cpu",), summary="the unfused graph behind Python custom operators (a test)",
        unavailable_reason=lambda device: None if device == "cpu" else "it serves cpu tensors only",
        load_operators=lambda: {"pool_mixer": (fake_forward, fake_backward)},
        checks_in_python=True, auto_devices=()))


@pytest.fixture
def fake_backend():
    record = _register_fake_backend()
    yield record
    backends.unregister_backend(FAKE)


def test_a_registered_backend_serves_every_consumer(fake_backend):
    x, kw = make_inputs((2, 6, 5, 4))
    grad_y = random_like(x, 1)
    # pool_mixer and autograd
    y, grads = forward_backward(lambda *a, **k: fused_poolformer.pool_mixer(*a, backend=FAKE, **k), x, kw, grad_y,
                                num_groups=2)
    y_ref, grads_ref = reference_forward_backward(x, kw, grad_y, num_groups=2)
    assert_close_to(y, y_ref, torch.float32, "y")
    for name in ("x", "weight", "layer_scale", "res_scale"):
        assert_close_to(grads[name], grads_ref[name], torch.float32, name)
    # the backend lists and the choice
    assert FAKE in fused_poolformer.available_backends("cpu") and FAKE in backends.names()
    assert fused_poolformer.ops.choose_backend("auto", x) != FAKE  # not picked by "auto"
    with pytest.raises(ValueError, match=f"backend='{FAKE}' cannot serve a tensor on meta"):
        fused_poolformer.pool_mixer(x.to("meta"), backend=FAKE)
    # the modules and the conversion
    module = fused_poolformer.FusedPoolMixer(6, num_groups=2, layer_scale_init_value=0.5, backend=FAKE)
    assert torch.allclose(module(x), call(reference.pool_mixer, x, dict(
        weight=module.weight, bias=module.bias, layer_scale=module.layer_scale, res_scale=None, sample_scale=None),
        num_groups=2), atol=1e-5)
    from conversion_checks import tiny_metaformer  # noqa: E402

    model = tiny_metaformer()
    converted = fused_poolformer.convert_model(model, backend=FAKE)
    assert converted.fused_poolformer_report.converted
    image = torch.randn(2, 3, 32, 32)
    assert torch.allclose(converted.eval()(image), model.eval()(image), atol=1e-4)
    # the MAC counters see its operators
    assert fake_forward._qualname in backends.fused_operator_names()[0]
    assert fake_forward._qualname in flops.register_flop_counter_formulas()
    # the test helpers
    assert device_of(FAKE) == "cpu" and unavailable_reason(FAKE) is None
    assert backend_params(FAKE)[0].values == (FAKE,)


def test_an_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_poolformer.FusedPoolMixer(4, backend="nope")
    with pytest.raises(ValueError, match="convert_model: backend must be one of"):
        fused_poolformer.convert_model(torch.nn.Identity(), backend="nope")
    with pytest.raises(ValueError, match="a name other than 'auto'"):
        backends.register_backend(backends.Backend(
            name="auto", devices=("cpu",), summary="", unavailable_reason=lambda d: None,
            load_operators=dict, checks_in_python=True))


# ---------------------------------------------------------------------------------------
# The pool rule: odd k, stride 1, padding k // 2, count_include_pad=False.

POOL_RULE_PATTERNS = {
    "a pool size halved or tested for oddness": r"\b(pool_size|kernel_size|k)\s*(//|/|%)\s*2\b",
    "count_include_pad given a value": r"count_include_pad\s*=\s*(False|True|0|1)\b",
    "avg_pool2d's flags spelled out": r"avg_pool2d(_backward)?\([^)]*\bfalse,\s*false",
    "the rule's error text": r"positive odd integer",
}
POOL_RULE_HOMES = {os.path.join("fused_poolformer", "contract.py"), os.path.join("csrc", "pool_mixer.h")}


def _sources():
    for top, suffixes in (("fused_poolformer", (".py",)), ("csrc", (".h", ".cpp", ".cu", ".cuh"))):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(suffixes):
                    path = os.path.join(folder, name)
                    yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_the_pool_rule_is_stated_in_one_python_and_one_cpp_place():
    found = {}
    for path, text in _sources():
        for what, pattern in POOL_RULE_PATTERNS.items():
            if re.search(pattern, text):
                found.setdefault(path, []).append(what)
    strays = {path: whats for path, whats in found.items() if path not in POOL_RULE_HOMES}
    assert not strays, f"the pool rule restated outside {sorted(POOL_RULE_HOMES)}: {strays}"
    assert set(found) == POOL_RULE_HOMES  # and the homes do state it (the patterns still match)


def test_the_python_pool_rule_is_the_one_the_unfused_graph_uses():
    pool = torch.nn.AvgPool2d(**contract.pool_arguments(5))
    assert contract.avg_pool_mismatch(pool) is None
    assert "count_include_pad=True" in contract.avg_pool_mismatch(torch.nn.AvgPool2d(3, 1, 1))
    assert "stride" in contract.avg_pool_mismatch(torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False))
    for bad in (0, 2, -1, True, 3.0):
        with pytest.raises(ValueError, match="pool_size must be a positive odd integer"):
            contract.check_pool_size(bad)


# ---------------------------------------------------------------------------------------
# The README is a user's guide: short, and every relative link resolves.

MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(path):
    text = open(path, encoding="utf-8").read()
    for target in MARKDOWN_LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("page", ["README.md"] + [os.path.join("docs", name) for name in
                                                  sorted(os.listdir(os.path.join(ROOT, "docs")))])
def test_every_relative_link_resolves(page):
    path = os.path.join(ROOT, page)
    missing = [target for target in _relative_links(path)
               if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target)))]
    assert not missing, f"{page} links to missing files: {missing}"


def test_the_readme_is_short():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().count("\n")
    assert lines < 250, f"README.md has {lines} lines; dated results belong in docs/results.md"
