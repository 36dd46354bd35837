"""ONNX export (fused_poolformer.onnx_export): converted timm PoolFormer v1 and v2 models and the
forward operator alone export with the translation table to standard ONNX operators, pass
onnx's full check, and run in ONNX Runtime's CPU provider at batch sizes other than the
exported one, matching PyTorch; what the table cannot express raises, naming the block."""

import ctypes
import importlib.util
import os
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from helpers import ROOT, assert_close_to, make_inputs, reference64, requires_cpu_kernels  # noqa: E402

import fused_poolformer  # noqa: E402
from fused_poolformer import FusedPoolMixer, reference  # noqa: E402
from fused_poolformer.onnx_export import export  # noqa: E402

# The C++ operator is what the translation translates (without it a model runs unfused).
pytestmark = requires_cpu_kernels

BATCH = torch.export.Dim("batch")
IMAGE = 64  # small images keep the model exports and ONNX Runtime runs quick


# ---------------------------------------------------------------------------------------
# ONNX Runtime, bfloat16 included (its Python API has no NumPy type for bfloat16).


def onnx_runtime_session(program):
    """An ONNX Runtime CPU session of an exported ``ONNXProgram`` (or a ModelProto)."""
    model_proto = getattr(program, "model_proto", program)
    return ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs: Tensor) -> list:
    """The outputs of ``session`` (or of an exported program's new session) on ``inputs``."""
    if not isinstance(session, ort.InferenceSession):
        session = onnx_runtime_session(session)
    feeds = {meta.name: _ort_value(tensor) for meta, tensor in zip(session.get_inputs(), inputs)}
    return [_torch_tensor(value) for value in session.run_with_ort_values(None, feeds)]


def _ort_value(tensor: Tensor):
    tensor = tensor.contiguous()  # ONNX has no layouts: a channels_last input is fed as NCHW
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.int16).numpy()
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(tensor.numpy())


def _torch_tensor(value) -> Tensor:
    if value.data_type() != "tensor(bfloat16)":
        return torch.from_numpy(value.numpy())
    count = value.tensor_size_in_bytes() // 2
    bits = (ctypes.c_int16 * count).from_address(value.data_ptr())
    return torch.frombuffer(bytearray(bits), dtype=torch.bfloat16).reshape(value.shape())


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Max-abs error relative to max |expected|."""
    expected = expected.detach().double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def assert_standard_onnx(model_proto, *op_types: str) -> None:
    """Only operators of the standard ONNX domain, no local functions, and ``op_types`` among them."""
    nodes = model_proto.graph.node
    assert {node.domain for node in nodes} == {""}, sorted({node.domain for node in nodes})
    assert not model_proto.functions, [function.name for function in model_proto.functions]
    assert set(op_types) <= {node.op_type for node in nodes}, sorted({node.op_type for node in nodes})


# ---------------------------------------------------------------------------------------
# Converted timm models.


def converted_timm_model(name: str, fuse: str = "block", **timm_options) -> nn.Module:
    """timm's ``name`` (random init), converted, with both branches' norm weights and biases,
    layer scales and res scales drawn from U(0.5, 1.5): timm's layer-scale init of 1e-5
    would leave the fused branches too small for a wrong translation to show in the logits."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = fused_poolformer.convert_model(timm.create_model(name, pretrained=False, **timm_options), fuse=fuse)
    assert model.fused_poolformer_report.converted
    assert set(model.fused_poolformer_report.levels.values()) == {fuse}
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if re.search(r"\.(norm[12]|layer_scale[12]|res_scale[12])\.", parameter_name):
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("fuse", ["block", "mixer"])
@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12"])
def test_converted_timm_model_matches_in_onnx_runtime_at_other_batch_sizes(name, fuse):
    model = converted_timm_model(name, fuse).eval()
    program = export(model, (torch.randn(2, 3, IMAGE, IMAGE),), dynamic_shapes=({0: BATCH},), verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    assert_standard_onnx(program.model_proto, "LayerNormalization", "AveragePool")
    session = onnx_runtime_session(program)
    for batch in (1, 3):
        x = torch.randn(batch, 3, IMAGE, IMAGE)
        with torch.no_grad():
            expected = model(x)
        (actual,) = run_onnx(session, x)
        assert relative_error(actual, expected) < 1e-4, f"batch {batch}"


# ---------------------------------------------------------------------------------------
# The forward operator alone, against the float64 reference.


class ForwardOperator(nn.Module):
    """Calls the C++ forward operator, as a converted model's graph does, and returns its
    three outputs; ``sample_scale`` is an input (it has the batch size)."""

    def __init__(self, vectors: dict, num_groups: int, pool_size: int):
        super().__init__()
        for name in ("weight", "bias", "layer_scale", "res_scale"):
            if vectors[name] is None:  # torch.export (2.14) fails on a module with a None buffer
                setattr(self, name, None)
            else:
                self.register_buffer(name, vectors[name])
        self.num_groups, self.pool_size = num_groups, pool_size

    def forward(self, x, sample_scale=None):
        return torch.ops.fused_poolformer.pool_mixer_forward(
            x, self.weight, self.bias, self.layer_scale, self.res_scale, sample_scale, self.num_groups,
            self.pool_size, 1e-5)


EVERY_VECTOR = ("weight", "bias", "layer_scale", "res_scale", "sample_scale")
OPERATOR_CASES = {
    "one_group": dict(),
    "four_groups": dict(num_groups=4),
    "no_layer_scale": dict(options=("weight", "bias", "res_scale", "sample_scale")),
    "no_vectors": dict(options=()),
    "pool_5_window_taller_than_plane": dict(pool_size=5, shape=(2, 8, 3, 9)),
    "float16_float32_vectors": dict(dtype=torch.float16, param_dtype=torch.float32),
    "bfloat16": dict(dtype=torch.bfloat16),
    "channels_last": dict(channels_last=True),
    "opset21_two_groups_float16": dict(opset_version=21, num_groups=2, dtype=torch.float16),
}


@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_forward_operator_matches_reference_in_onnx_runtime(case):
    options = dict(shape=(2, 8, 7, 9), dtype=torch.float32, num_groups=1, pool_size=3, opset_version=20,
                   options=EVERY_VECTOR, channels_last=False, param_dtype=None)
    options.update(OPERATOR_CASES[case])
    dtype, num_groups, pool_size = options["dtype"], options["num_groups"], options["pool_size"]

    def inputs(batch, seed):
        shape = (batch,) + options["shape"][1:]
        return make_inputs(shape, dtype=dtype, channels_last=options["channels_last"], options=options["options"],
                           seed=seed, param_dtype=options["param_dtype"])

    x, vectors = inputs(2, seed=0)
    module = ForwardOperator(vectors, num_groups, pool_size)
    example = (x,) if vectors["sample_scale"] is None else (x, vectors["sample_scale"])
    program = export(module, example, dynamic_shapes=({0: BATCH},) * len(example),
                     opset_version=options["opset_version"], verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    normalization = "GroupNormalization" if options["opset_version"] >= 21 else "LayerNormalization"
    assert_standard_onnx(program.model_proto, normalization, "AveragePool")

    x3, vectors3 = inputs(3, seed=1)  # another batch size, other values
    vectors3 = dict(vectors, sample_scale=vectors3["sample_scale"])
    run = (x3,) if vectors3["sample_scale"] is None else (x3, vectors3["sample_scale"])
    y, mean, rstd = run_onnx(program, *run)
    assert y.dtype == dtype and y.shape == x3.shape
    assert_close_to(y, reference64(x3, vectors3, num_groups=num_groups, pool_size=pool_size), dtype, "y")
    _, torch_mean, torch_rstd = module(*run)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean, torch_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, torch_rstd, rtol=1e-5, atol=1e-6)


def test_float64_is_refused():
    x, vectors = make_inputs((2, 8, 5, 6), dtype=torch.float64)
    with pytest.raises(torch.onnx.OnnxExporterError, match="supports float32, float16 and bfloat16 inputs, got double"):
        export(ForwardOperator(vectors, 1, 3), (x,), verbose=False)


# The Triton operator is reachable only where the Triton kernels are not interpreted: under
# TRITON_INTERPRET=1 (set by helpers.py without a GPU) its fake kernel runs the interpreter,
# which cannot trace.  So a fresh process without it exports (tracing runs no kernel) and
# saves the model and its inputs; this one checks and runs them.
TRITON_EXPORT = """
import sys, torch
from fused_poolformer.onnx_export import onnx_translation_table

class TritonOperator(torch.nn.Module):
    def forward(self, x, weight, layer_scale):
        return torch.ops.fused_poolformer.triton_pool_mixer_forward(x, weight, None, layer_scale, None, None, 2, 3,
                                                                   1e-5)[0]

torch.manual_seed(0)
inputs = (torch.randn(2, 8, 6, 7), torch.rand(8) + 0.5, torch.rand(8) + 0.5)
table = onnx_translation_table()
assert torch.ops.fused_poolformer.triton_pool_mixer_forward.default in table
program = torch.onnx.export(TritonOperator(), inputs, dynamo=True, custom_translation_table=table, verbose=False)
program.save(sys.argv[1] + "/triton.onnx")
torch.save(inputs, sys.argv[1] + "/inputs.pt")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_operator_translates(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", TRITON_EXPORT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model_proto = onnx.load(str(tmp_path / "triton.onnx"))
    onnx.checker.check_model(model_proto, full_check=True)
    assert_standard_onnx(model_proto, "LayerNormalization", "AveragePool")
    x, weight, layer_scale = torch.load(tmp_path / "inputs.pt")
    (y,) = run_onnx(onnx_runtime_session(model_proto), x, weight, layer_scale)
    expected = fused_poolformer.reference.pool_mixer(x.double(), weight.double(), layer_scale=layer_scale.double(),
                                                     num_groups=2)
    assert relative_error(y, expected) < 2e-5


# ---------------------------------------------------------------------------------------
# What the table cannot express: an error naming the block.


@pytest.mark.parametrize("fuse, block_class", [("block", "BlockFusedMetaFormerBlock"),
                                               ("mixer", "FusedMetaFormerBlock")])
def test_export_names_the_block_whose_drop_path_is_random(fuse, block_class):
    model = converted_timm_model("poolformer_s12", fuse, drop_path_rate=0.1).train()
    # timm's drop-path rates rise from 0: stages.0.blocks.0 has none, stages.0.blocks.1 the first.
    with pytest.raises(ValueError, match=re.escape(f"block 'stages.0.blocks.1' ({block_class}): draws "
                                                   "aten::bernoulli")):
        export(model, (torch.randn(2, 3, IMAGE, IMAGE),), verbose=False)


def small_model(mixer: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 8, 1), mixer=mixer))


def test_export_names_the_block_whose_drop_path_is_random_on_the_reference_backend():
    """The unfused graph of backend='reference' holds no fused operator, but its mask is as random."""
    model = small_model(FusedPoolMixer(8, drop_path=0.5, backend="reference")).train()
    with pytest.raises(ValueError, match=re.escape("block 'mixer' (FusedPoolMixer): draws aten::bernoulli")):
        export(model, (torch.randn(2, 3, 5, 5),), verbose=False)


@pytest.mark.parametrize("drop_path, training", [(0.5, False), (0.0, True)])
def test_export_accepts_drop_path_that_draws_nothing(drop_path, training):
    """Drop path in eval mode, or with probability 0 in training mode, is no mask at all."""
    model = small_model(FusedPoolMixer(8, layer_scale_init_value=0.5, drop_path=drop_path)).train(training)
    x = torch.randn(2, 3, 5, 5)
    (actual,) = run_onnx(export(model, (x,), verbose=False), x)
    assert relative_error(actual, model(x)) < 1e-5


@torch.library.custom_op("fused_poolformer_onnx_test::unlisted_forward", mutates_args=())
def unlisted_forward(x: Tensor, weight: Tensor) -> Tensor:
    return fused_poolformer.reference.pool_mixer(x, weight)


@unlisted_forward.register_fake
def _(x, weight):
    return torch.empty_like(x)


class UnlistedBackendMixer(FusedPoolMixer):
    """A fused block whose operator (another backend's) has no translation in the table."""

    def forward(self, x):
        return unlisted_forward(x, self.weight)


def test_export_names_the_block_calling_an_operator_without_translation():
    model = small_model(UnlistedBackendMixer(8))
    with pytest.raises(ValueError, match=re.escape("block 'mixer' (UnlistedBackendMixer): calls "
                                                   "fused_poolformer_onnx_test::unlisted_forward")):
        export(model, (torch.randn(2, 3, 5, 5),), verbose=False)


def test_export_refuses_dynamic_axes():
    model = small_model(FusedPoolMixer(8)).eval()
    with pytest.raises(TypeError, match="pass dynamic_shapes"):
        export(model, (torch.randn(2, 3, 5, 5),), dynamic_axes={"x": {0: "batch"}})


# ---------------------------------------------------------------------------------------
# The whole-block operator alone, against the unfused graph.


class BlockOperator(nn.Module):
    """A whole block through ``poolformer_block`` (the C++ block operator), every vector random."""

    def __init__(self, activation: str, channels: int = 8, hidden: int = 20):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for name in ("norm1_weight", "norm1_bias", "layer_scale1", "res_scale1", "norm2_weight", "norm2_bias",
                     "fc2_bias", "layer_scale2", "res_scale2"):
            self.register_buffer(name, torch.rand(channels, generator=g) + 0.5)
        self.register_buffer("fc1_weight", torch.randn(hidden, channels, generator=g) * channels ** -0.5)
        self.register_buffer("fc1_bias", torch.randn(hidden, generator=g) * 0.3)
        self.register_buffer("fc2_weight", torch.randn(channels, hidden, generator=g) * hidden ** -0.5)
        self.activation = activation
        if activation == "star_relu":
            self.register_buffer("act_scale", torch.tensor([0.8]))
            self.register_buffer("act_bias", torch.tensor([-0.1]))
        else:
            self.act_scale = self.act_bias = None

    def arguments(self):
        return {name: getattr(self, name) for name in (
            "norm1_weight", "norm1_bias", "layer_scale1", "res_scale1", "norm2_weight", "norm2_bias", "fc1_weight",
            "fc1_bias", "fc2_weight", "fc2_bias", "layer_scale2", "res_scale2", "act_scale", "act_bias")}

    def forward(self, x):
        return fused_poolformer.poolformer_block(x, **self.arguments(), activation=self.activation, backend="cpu")


@pytest.mark.parametrize("activation, opset_version, dtype", [
    ("gelu", 20, torch.float32), ("gelu_tanh", 18, torch.float32), ("star_relu", 21, torch.float32),
    ("gelu", 18, torch.bfloat16)])
def test_block_operator_matches_the_unfused_graph_in_onnx_runtime(activation, opset_version, dtype):
    module = BlockOperator(activation).to(dtype)
    x = torch.randn(2, 8, 5, 6).to(dtype)
    program = export(module, (x,), dynamic_shapes=({0: BATCH},), opset_version=opset_version, verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    assert_standard_onnx(program.model_proto, "Conv", "AveragePool")
    session = onnx_runtime_session(program)
    for batch in (1, 3):
        x = torch.randn(batch, 8, 5, 6).to(dtype)
        arguments = {k: (v.double() if v is not None else None) for k, v in module.arguments().items()}
        expected = reference.poolformer_block(x.double(), **arguments, activation_kind=activation)
        (actual,) = run_onnx(session, x)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert relative_error(actual, expected) < tolerance, f"batch {batch}"
