"""ONNX export of models holding the fused operators (the ``torch.onnx.export(dynamo=True)`` path).

The ONNX exporter translates every operator of a ``torch.export`` graph to ONNX through a
registry of onnxscript functions; it has none for this package's operators.
:func:`onnx_translation_table` returns the entries to pass as

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=onnx_translation_table())

Each entry writes the operator as standard ONNX operators, nothing custom: ones that ONNX
Runtime runs natively (tests/test_onnx.py) and TensorRT's ONNX parser lists (not tried here):

    GroupNorm without affine   LayerNormalization(axis=1) for one group (opset 17+); for G
                               groups the same over a (N, G, C/G*H*W) reshape; at opset 21+
                               GroupNormalization-21 instead
    pool minus input           AveragePool with the pool rule (contract.pool_arguments), Sub
    scales and residual        Mul by weight*layer_scale (per channel), by sample_scale (per
                               sample), Add res_scale*x

The GroupNorm affine enters only through its weight, folded into the layer-scale multiply:
a per-channel factor commutes with the pool, and the bias, a per-channel constant, cancels
in Pool(n) - n (docs/math.md section 2), as it does in the fused kernels.  Half-precision
inputs are computed in float32 and the output cast back once, as the kernels do (ONNX
Runtime's CPU provider has no bfloat16 AveragePool); the (N, G) mean and rstd outputs come
in float32, as the operator's contract says.  float64 inputs are refused (TypeError): ONNX
Runtime's CPU provider has no float64 AveragePool and TensorRT no float64 at all.

:func:`export` is ``torch.onnx.export`` with the table, after checking the model: a fused
block whose call the table cannot express -- drop path active in training mode (its mask is
random), or an operator of a backend the table does not cover -- raises ``ValueError``
naming the block, instead of exporting a graph that computes something else.  (Called
directly, ``torch.onnx.export`` exports a training-mode drop path as ONNX random operators,
with its usual warning about training mode: the translation sees only the mask's values.)

The whole-block operator (``block_forward``, docs/block.md) is written as the mixer above,
then Norm2 (the same normalization, one group), two 1x1 ``Conv``s, ``Gelu`` (opset 20+; its
formula below) or StarReLU (``Relu``, ``Mul``, ``Add``), the scales and the residual.

To translate another operator: write its translation function, taking the operator's
arguments in schema order and returning its outputs, and add one ``(operator name,
function)`` line to ``_TRANSLATIONS`` (and the module that calls it to ``FUSED_BLOCK_TYPES``,
so that export() checks that module's calls too).
"""

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import contract, ops
from .modules import FusedMetaFormerBlock, FusedPoolFormerBlock, FusedPoolMixer

__all__ = ["check_exportable", "export", "onnx_translation_table", "translate_block_forward",
           "translate_pool_mixer_forward"]

# The opset whose GroupNormalization takes per-channel scale and bias (GroupNormalization-18
# took them per group and is deprecated); below it the LayerNormalization form is written.
GROUP_NORMALIZATION_OPSET = 21

# The modules whose own forward calls a fused operator: export() checks the operators they call.
FUSED_BLOCK_TYPES = (FusedPoolMixer, FusedMetaFormerBlock, FusedPoolFormerBlock)
# Namespaces whose operators the exporter translates itself.
_EXPORTER_NAMESPACES = frozenset({"aten", "prims"})


def _onnxscript():
    """onnxscript and its IR, imported on first use: they are optional dependencies."""
    import onnxscript
    from onnxscript import ir

    return onnxscript, ir


# ---------------------------------------------------------------------------------------
# The translation of pool_mixer_forward (C++ and Triton operators: one schema).


def translate_pool_mixer_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size,
                                 eps):
    """ONNX for ``pool_mixer_forward(...) -> (y, mean, rstd)``, traced by the exporter.

    Arguments come as the exporter hands them over: tensors as symbolic ONNX values (None
    for an absent optional one), ``num_groups``, ``pool_size``, ``eps`` as Python numbers.
    ``bias`` is unused: it cancels out of the output (module docstring).  Everything is
    computed in float32 (half inputs too: one rounding at the end, as in the kernels).
    """
    onnxscript, ir = _onnxscript()
    op = onnxscript.opset18
    _check_dtype(x.dtype)
    x_float = op.Cast(x, to=ir.DataType.FLOAT)
    normed, mean, rstd = _group_norm(x_float, num_groups, eps)
    rule = contract.pool_arguments(pool_size)
    pooled = op.AveragePool(normed, kernel_shape=[rule["kernel_size"]] * 2, strides=[rule["stride"]] * 2,
                            pads=[rule["padding"]] * 4, count_include_pad=int(rule["count_include_pad"]))
    mixed = op.Sub(pooled, normed)
    coefficient = _channel_product(weight, layer_scale)
    if coefficient is not None:
        mixed = op.Mul(mixed, coefficient)
    if sample_scale is not None:
        mixed = op.Mul(mixed, op.Reshape(op.Cast(sample_scale, to=ir.DataType.FLOAT), [-1, 1, 1, 1]))
    shortcut = x_float if res_scale is None else op.Mul(x_float, _channel_product(res_scale))
    y = op.Cast(op.Add(shortcut, mixed), to=x.dtype)
    return y, mean, rstd


def _check_dtype(dtype) -> None:
    """TypeError for an input the translation does not write: float64, which ONNX Runtime's
    CPU provider (no float64 AveragePool) and TensorRT (no float64) cannot run, and whose
    LayerNormalization statistics ONNX keeps in float32 at best."""
    _, ir = _onnxscript()
    if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        raise TypeError(f"pool_mixer_forward: ONNX export supports float32, float16 and bfloat16 inputs, got "
                        f"{dtype.name.lower()} (ONNX Runtime and TensorRT run no float64 AveragePool); export a "
                        "float32 copy of the model (model.float())")


def _channel_product(*vectors):
    """The product of the given (C,) vectors (None ones skipped) in float32 as a (C, 1, 1)
    value, or None when every one is absent."""
    onnxscript, ir = _onnxscript()
    op = onnxscript.opset18
    present = [op.Cast(vector, to=ir.DataType.FLOAT) for vector in vectors if vector is not None]
    if not present:
        return None
    product = present[0]
    for vector in present[1:]:
        product = op.Mul(product, vector)
    return op.Reshape(product, [-1, 1, 1])


def _group_norm(x, num_groups: int, eps: float):
    """(GroupNorm(x) without affine, mean (N, G), rstd (N, G)) in ONNX, for a float32 x."""
    if _target_opset() >= GROUP_NORMALIZATION_OPSET:
        return _group_normalization_21(x, num_groups, eps)
    return _layer_normalization(x, num_groups, eps)


def _target_opset() -> int:
    """The opset of the graph being built: the exporter's recorder knows it (``opset_version``
    of ``torch.onnx.export``).  Where it cannot be read, 0 selects the LayerNormalization
    form, which is valid from opset 17 on."""
    onnxscript, _ = _onnxscript()
    recorder_opset = getattr(onnxscript.evaluator.default(), "opset", None)
    return getattr(recorder_opset, "version", 0)


def _filled(shape, value: float):
    """A float32 tensor of the (dynamic) ``shape`` filled with ``value``: a normalization's
    unit scale or zero bias."""
    onnxscript, ir = _onnxscript()
    return onnxscript.opset18.ConstantOfShape(shape, value=ir.tensor([value], dtype=ir.DataType.FLOAT))


def _layer_normalization(x, num_groups: int, eps: float):
    """GroupNorm as LayerNormalization: over (C, H, W) (axis 1) for one group, else over the
    last axis of x reshaped to (N, G, C/G*H*W).  Its Mean and InvStdDev outputs are the
    operator's statistics ((N, 1, 1, 1) or (N, G, 1), flattened to (N, G))."""
    onnxscript, _ = _onnxscript()
    op = onnxscript.opset18
    grouped = x if num_groups == 1 else op.Reshape(x, [0, num_groups, -1])
    axis = 1 if num_groups == 1 else 2
    scale = _filled(op.Shape(grouped, start=axis), 1.0)
    normed, mean, inv_std = op.LayerNormalization(grouped, scale, axis=axis, epsilon=eps)
    if num_groups != 1:
        normed = op.Reshape(normed, op.Shape(x))
    return normed, op.Flatten(mean, axis=1), op.Flatten(inv_std, axis=1)


def _group_normalization_21(x, num_groups: int, eps: float):
    """GroupNorm as GroupNormalization-21 (unit per-channel scale, zero bias).  It has no
    statistics outputs: mean and rstd are computed beside it (an inference graph never
    reads them, and the exporter's optimizer drops what is unread)."""
    onnxscript, _ = _onnxscript()
    op, op21 = onnxscript.opset18, onnxscript.opset21
    channels = op.Shape(x, start=1, end=2)
    normed = op21.GroupNormalization(x, _filled(channels, 1.0), _filled(channels, 0.0), num_groups=num_groups,
                                     epsilon=eps)
    grouped = op.Reshape(x, [0, num_groups, -1])
    mean = op.ReduceMean(grouped, [2], keepdims=1)
    centered = op.Sub(grouped, mean)
    variance = op.ReduceMean(op.Mul(centered, centered), [2], keepdims=0)
    rstd = op.Reciprocal(op.Sqrt(op.Add(variance, op.CastLike(eps, variance))))
    return normed, op.Flatten(mean, axis=1), rstd


# ---------------------------------------------------------------------------------------
# The translation of block_forward: the mixer above, then Norm2, two 1x1 Convs, the
# activation, the scales and the residual, in float32.

# The opset that has Gelu (with its approximate attribute); below it GELU is written out.
GELU_OPSET = 20


def translate_block_forward(x, norm1_weight, norm1_bias, layer_scale1, res_scale1, sample_scale1, num_groups1,
                            pool_size, eps1, norm2_weight, norm2_bias, eps2, fc1_weight, fc1_bias, fc2_weight,
                            fc2_bias, layer_scale2, res_scale2, sample_scale2, activation, act_scale, act_bias,
                            gemm_dtype, save_hidden):
    """ONNX for ``block_forward(...) -> (out, hidden, mean1, rstd1, mean2, rstd2)``
    (docs/block.md): every step in float32 (``gemm_dtype`` is a speed choice of the fused
    kernels, not part of the result), the output cast back to x's dtype once."""
    onnxscript, ir = _onnxscript()
    op = onnxscript.opset18
    x1, mean1, rstd1 = translate_pool_mixer_forward(x, norm1_weight, norm1_bias, layer_scale1, res_scale1,
                                                    sample_scale1, num_groups1, pool_size, eps1)
    x1 = op.Cast(x1, to=ir.DataType.FLOAT)
    u, mean2, rstd2 = _group_norm(x1, 1, eps2)
    if norm2_weight is not None:
        u = op.Mul(u, _channel_product(norm2_weight))
    if norm2_bias is not None:
        u = op.Add(u, _channel_product(norm2_bias))
    hidden = _conv1x1(u, fc1_weight, fc1_bias)
    o = _conv1x1(_activation(hidden, activation, act_scale, act_bias), fc2_weight, fc2_bias)
    if layer_scale2 is not None:
        o = op.Mul(o, _channel_product(layer_scale2))
    if sample_scale2 is not None:
        o = op.Mul(o, op.Reshape(op.Cast(sample_scale2, to=ir.DataType.FLOAT), [-1, 1, 1, 1]))
    shortcut = x1 if res_scale2 is None else op.Mul(x1, _channel_product(res_scale2))
    out = op.Cast(op.Add(shortcut, o), to=x.dtype)
    if not save_hidden:  # the operator returns an empty tensor then
        hidden = op.Slice(op.Reshape(hidden, [-1]), [0], [0])
    return out, hidden, mean1, rstd1, mean2, rstd2


def _conv1x1(t, weight, bias):
    """A 1x1 Conv of float32 t by an (out, in) weight."""
    onnxscript, ir = _onnxscript()
    op = onnxscript.opset18
    kernel = op.Unsqueeze(op.Cast(weight, to=ir.DataType.FLOAT), [2, 3])
    if bias is None:
        return op.Conv(t, kernel)
    return op.Conv(t, kernel, op.Cast(bias, to=ir.DataType.FLOAT))


def _activation(h, kind: str, scale, bias):
    """GELU (Gelu-20, or its erf / tanh formula below opset 20) or StarReLU s * Relu(h)^2 + b."""
    onnxscript, ir = _onnxscript()
    op = onnxscript.opset18
    if kind == "star_relu":
        relu = op.Relu(h)
        out = op.Mul(relu, relu)
        if scale is not None:
            out = op.Mul(out, op.Cast(scale, to=ir.DataType.FLOAT))
        return out if bias is None else op.Add(out, op.Cast(bias, to=ir.DataType.FLOAT))
    approximate = "tanh" if kind == "gelu_tanh" else "none"
    if _target_opset() >= GELU_OPSET:
        return onnxscript.opset20.Gelu(h, approximate=approximate)
    half = op.Mul(h, op.CastLike(0.5, h))
    if approximate == "none":
        return op.Mul(half, op.Add(op.CastLike(1.0, h), op.Erf(op.Mul(h, op.CastLike(0.5 ** 0.5, h)))))
    inner = op.Mul(op.CastLike((2 / 3.141592653589793) ** 0.5, h),
                   op.Add(h, op.Mul(op.CastLike(0.044715, h), op.Mul(h, op.Mul(h, h)))))
    return op.Mul(half, op.Add(op.CastLike(1.0, h), op.Tanh(inner)))


# ---------------------------------------------------------------------------------------
# The table.

# (operator name in the fused_poolformer namespace, translation).  An operator not
# registered in this process (the Triton one where triton cannot be imported) is left out.
_TRANSLATIONS: Tuple[Tuple[str, Callable], ...] = (
    ("pool_mixer_forward", translate_pool_mixer_forward),
    ("triton_pool_mixer_forward", translate_pool_mixer_forward),
    ("block_forward", translate_block_forward),
    ("triton_block_forward", translate_block_forward),
)


def onnx_translation_table() -> Dict[torch._ops.OpOverload, Callable]:
    """{operator overload: onnxscript translation} for every fused operator registered in
    this process, to pass as ``torch.onnx.export(..., dynamo=True, custom_translation_table=)``.

    The translations pick the normalization by the export's ``opset_version``:
    LayerNormalization below 21 (the exporter's default is 20), GroupNormalization-21 from
    21 on.  Building the table imports the Triton backend where triton is installed, so that
    its operator is registered (a model calling it does so while it is traced, after the
    table is built).
    """
    _onnxscript()  # a clear ImportError now, not inside the exporter
    ops.triton_available()
    table = {}
    for name, translation in _TRANSLATIONS:
        packet = getattr(torch.ops.fused_poolformer, name, None)
        if packet is not None:
            table[packet.default] = translation
    return table


# ---------------------------------------------------------------------------------------
# export(): the table, after checking what the table cannot express.


def export(model: nn.Module, args: tuple = (), f=None, *, kwargs: Optional[dict] = None, dynamic_shapes=None,
           strict: bool = False, custom_translation_table: Optional[dict] = None, **onnx_options):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with :func:`onnx_translation_table`.

    The model is captured with ``torch.export.export(model, args, kwargs,
    dynamic_shapes=dynamic_shapes, strict=strict)`` and checked first: a ``ValueError``
    names each block the table cannot express (see :func:`check_exportable`).  Then the
    program goes to ``torch.onnx.export`` with ``onnx_options`` (``opset_version``,
    ``input_names``, ``optimize``, ...); ``custom_translation_table`` entries are added
    to this package's.  Returns the ``ONNXProgram`` (saved to ``f`` when given).
    ``dynamic_axes`` is refused: the capture takes ``dynamic_shapes``.
    """
    if "dynamic_axes" in onnx_options:
        raise TypeError("export: dynamic_axes is not supported here; pass dynamic_shapes "
                        "(torch.export's form, e.g. ({0: torch.export.Dim('batch')},))")
    table = {**onnx_translation_table(), **(custom_translation_table or {})}
    program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    check_exportable(program, model, table)
    return torch.onnx.export(program, (), f, dynamo=True, custom_translation_table=table, **onnx_options)


def check_exportable(program: torch.export.ExportedProgram, model: nn.Module, table: dict) -> None:
    """ValueError naming the first fused block of ``model`` (``FUSED_BLOCK_TYPES``) whose own
    forward, as captured in ``program``, calls what the translations cannot express:

    - a random operator: drop path active in training mode, whose mask an exported graph
      would draw anew at every run (with ONNX's generator, not PyTorch's);
    - an operator that neither ``table`` nor the exporter translates (a backend this
      package has no translation for).

    A block is named by its qualified name in ``model`` (``stages.1.blocks.0``).  Calls
    made inside the block's children (its MLP, the MLP branch's DropPath) are the
    exporter's business, as in the unconverted model.
    """
    fused_paths = {name for name, module in model.named_modules() if isinstance(module, FUSED_BLOCK_TYPES)}
    translated = {target.name() for target in table if isinstance(target, torch._ops.OpOverload)}
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        path, block_type = _calling_module(node)
        if path not in fused_paths:
            continue
        name = node.target.name()
        if torch.Tag.nondeterministic_seeded in node.target.tags:
            raise ValueError(
                f"{_describe(path, block_type)}: draws {name} (drop path active in training mode): an exported "
                "graph would draw new masks at every run; export the model in eval mode (model.eval())")
        if node.target.namespace not in _EXPORTER_NAMESPACES and name not in translated:
            backend = getattr(model.get_submodule(path), "backend", None)
            raise ValueError(
                f"{_describe(path, block_type)}: calls {name} (backend={backend!r}), which has no ONNX translation; "
                "export it with backend='auto' (or 'cpu', 'cuda', 'triton', 'reference'), or add a translation "
                "for that operator to custom_translation_table")


def _calling_module(node: torch.fx.Node) -> Tuple[str, str]:
    """(qualified name, type name) of the innermost module whose forward called ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    return list(stack.values())[-1]


def _describe(path: str, block_type: str) -> str:
    short_type = block_type.rsplit(".", 1)[-1]
    return f"block {path!r} ({short_type})" if path else f"the model ({short_type})"
