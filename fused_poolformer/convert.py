"""Swap fused blocks into existing PoolFormer / MetaFormer models.

``convert_model(model)`` walks the module tree and replaces every block it can serve
with its fused twin (``fused_poolformer.modules``):

- a ``MetaFormerBlock`` with a ``Pooling`` token mixer becomes a
  :class:`~fused_poolformer.modules.FusedMetaFormerBlock`: timm's (every ``poolformer_*``
  and ``poolformerv2_*``, and the pooling stages of hybrid MetaFormers), on (N, C, H, W)
  tensors with a GroupNorm, and the official MetaFormer-baselines code's
  (sail-sg/metaformer ``metaformer_baselines.py``: ``poolformerv2_*``), on (N, H, W, C)
  tensors with a ``LayerNormGeneral`` over (H, W, C);
- the original PoolFormer repository's ``PoolFormerBlock`` becomes a
  :class:`~fused_poolformer.modules.FusedPoolFormerBlock`.

Blocks are recognised by structure -- attribute names, norm type (which also tells the
tensor layout), pool settings, the class names of the small scale / drop-path / mixer
modules -- without importing timm or either repository.  Anything that looks like a
MetaFormer block (it has ``norm1``, ``token_mixer``, ``norm2`` and ``mlp``) but that the
fused op does not cover (another token mixer, a LayerNorm over C / BatchNorm, pool
settings other than stride 1, padding k//2, count_include_pad=False, odd k) is left as it
is and reported with the first reason found.  So is a block holding a hook on a module
the fused op stands in for (``norm1``, ``token_mixer``, the first branch's drop path and
scales, or their children), so that the hook keeps firing.

The report is a :class:`ConversionReport`, attached to the returned model as
``model.fused_poolformer_report`` and logged (logger ``"fused_poolformer"``, level INFO).
"""

import copy
import dataclasses
import logging
from typing import List, Optional, Tuple, Type

from torch import nn

from .modules import FusedMetaFormerBlock, FusedPoolFormerBlock, _AdoptedBlock, _check_backend

__all__ = ["ConversionReport", "check_block", "convert_model"]

logger = logging.getLogger("fused_poolformer")

_BLOCK_ATTRIBUTES = ("norm1", "token_mixer", "norm2", "mlp")
_METAFORMER_ATTRIBUTES = ("drop_path1", "layer_scale1", "res_scale1", "drop_path2", "layer_scale2", "res_scale2")
_ORIGINAL_ATTRIBUTES = ("drop_path", "use_layer_scale")


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_model` did: qualified names of the converted blocks and
    (name, reason) for every MetaFormer-like block it left as it was."""

    converted: List[str] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused_poolformer: converted {len(self.converted)} block(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {name or '<model>'}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _type_name(module) -> str:
    return type(module).__name__


def _check_pool(pool) -> Optional[str]:
    if not isinstance(pool, nn.AvgPool2d):
        return f"token_mixer.pool is {_type_name(pool)}, not AvgPool2d"
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    kh, kw = pair(pool.kernel_size)
    stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if kh != kw or kh % 2 == 0:
        return f"pool kernel_size {pool.kernel_size} is not a square odd window"
    if stride != (1, 1):
        return f"pool stride {pool.stride} is not 1"
    if pair(pool.padding) != (kh // 2, kh // 2):
        return f"pool padding {pool.padding} is not kernel_size // 2 = {kh // 2}"
    if pool.count_include_pad:
        return "pool has count_include_pad=True"
    if pool.ceil_mode or pool.divisor_override is not None:
        return "pool has ceil_mode or divisor_override set"
    return None


def _check_mixer(block) -> Optional[str]:
    mixer = block.token_mixer
    # The name pins the forward to pool(x) - x; a module merely holding an AvgPool2d may not be.
    if _type_name(mixer) != "Pooling" or not hasattr(mixer, "pool"):
        return f"token_mixer is {_type_name(mixer)}, not a Pooling mixer"
    if any(True for _ in mixer.parameters()):
        return "token_mixer has parameters"
    return _check_pool(mixer.pool)


def _vector_length(vector) -> Optional[int]:
    return vector.shape[0] if isinstance(vector, nn.Parameter) and vector.dim() == 1 else None


def _check_layer_norm_general(norm) -> Optional[str]:
    """The MetaFormer-baselines ``LayerNormGeneral`` on (N, H, W, C): the fused op's
    GroupNorm(1) when it normalizes over (H, W, C) with (C,) affine vectors."""
    dims = tuple(getattr(norm, "normalized_dim", ()))
    if sorted(d % 4 for d in dims) != [1, 2, 3]:
        if dims in ((-1,), (3,)):
            return ("norm1 is a LayerNormGeneral over C only (statistics per position, as in "
                    "ConvFormer / CAFormer), not over (H, W, C) per sample")
        return f"norm1 is a LayerNormGeneral over dims {dims}, not over (H, W, C) = (1, 2, 3)"
    lengths = set()
    for flag, name in (("use_scale", "weight"), ("use_bias", "bias")):
        if getattr(norm, flag, None) is None:
            return f"norm1 is a LayerNormGeneral without a {flag} flag"
        if getattr(norm, flag):
            length = _vector_length(getattr(norm, name, None))
            if length is None:
                return f"norm1.{name} is not a (C,) Parameter (it would not scale the channels of (N, H, W, C))"
            lengths.add(length)
    if len(lengths) > 1:
        return "norm1.weight and norm1.bias differ in length"
    return None


def _norm_layout(block) -> Tuple[Optional[str], Optional[str]]:
    """(layout of the block's tensors, None) where the fused op computes its ``norm1``,
    else (None, reason).  The norm tells the layout: timm's blocks normalize (N, C, H, W)
    with a GroupNorm, the official MetaFormer-baselines blocks (N, H, W, C) with a
    LayerNormGeneral."""
    norm = block.norm1
    if isinstance(norm, nn.GroupNorm):
        return "NCHW", None
    if _type_name(norm) == "LayerNormGeneral":
        reason = _check_layer_norm_general(norm)
        return (None, reason) if reason else ("NHWC", None)
    return None, f"norm1 is {_type_name(norm)}, not a GroupNorm or a LayerNormGeneral over (H, W, C)"


def _channels(norm) -> Optional[int]:
    """C from a GroupNorm or the affine vectors of a LayerNormGeneral (None: it has none)."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    return _vector_length(getattr(norm, "weight", None)) or _vector_length(getattr(norm, "bias", None))


# The per-channel scale modules a block of each layout may hold: class name -> (the
# attribute holding its (C,) vector, the dimensions after C its forward broadcasts the
# vector over; None where the class alone says it).  timm's ``Scale`` states the shape it
# views the vector as; the official one has no ``shape`` and multiplies the last dimension.
_SCALES = {
    "NCHW": {"Scale": ("scale", (1, 1)), "LayerScale2d": ("gamma", None)},
    "NHWC": {"Scale": ("scale", ()), "LayerScale": ("gamma", None)},
}


def _check_scale(module, name: str, channels: Optional[int], layout: str) -> Optional[str]:
    """Identity, or a scale module multiplying the C channels of a ``layout`` tensor by a
    (C,) vector.  Where C is unknown (a norm without affine vectors) any 1-D vector is
    taken: ``pool_mixer`` checks it against the input."""
    if isinstance(module, nn.Identity):
        return None
    kind = _type_name(module)
    if kind not in _SCALES[layout]:
        return f"{name} is {kind}, not Identity, {' or '.join(_SCALES[layout])} (for {layout} tensors)"
    attribute, trailing = _SCALES[layout][kind]
    length = _vector_length(getattr(module, attribute, None))
    if length is None or (channels is not None and length != channels):
        return f"{name}.{attribute} is not a ({channels or 'C'},) Parameter"
    shape = tuple(getattr(module, "shape", (length,)))  # no shape: multiplies the last dimension
    if trailing is not None and shape != (length,) + trailing:
        return f"{name} does not scale the {length} channels of an {layout} tensor (shape {shape})"
    return None


def _check_drop_path(module, name: str) -> Optional[str]:
    if isinstance(module, nn.Identity) or (_type_name(module) == "DropPath" and hasattr(module, "drop_prob")):
        return None
    return f"{name} is {_type_name(module)}, not Identity or DropPath"


# (what the report calls it, the nn.Module attribute holding the hooks)
_HOOK_KINDS = (
    ("forward pre-hook", "_forward_pre_hooks"),
    ("forward hook", "_forward_hooks"),
    ("backward pre-hook", "_backward_pre_hooks"),
    ("backward hook", "_backward_hooks"),
)


def hooked_module(block: nn.Module, names: Tuple[str, ...]) -> Optional[Tuple[str, str]]:
    """(qualified name, hook kind) of the first module at or under ``block.<name>`` (for
    each of ``names``) that holds a hook, or None where none does."""
    for name in names:
        for qualified, module in getattr(block, name).named_modules(prefix=name):
            for kind, attribute in _HOOK_KINDS:
                if getattr(module, attribute, None):
                    return qualified, kind
    return None


def _check_hooks(block, fused_class: Type[_AdoptedBlock]) -> Optional[str]:
    """A hook on a module the fused op stands in for would stop firing: keep the block."""
    hooked = hooked_module(block, fused_class.BYPASSED)
    if hooked is None:
        return None
    name, kind = hooked
    return f"{name} has a {kind}, which would not fire in a fused block (it does not call {name})"


def check_block(module: nn.Module) -> Tuple[Optional[Type[_AdoptedBlock]], Optional[str]]:
    """(fused class, None) where ``module`` can be converted, (None, reason) where it is a
    MetaFormer-like block that cannot, and (None, None) where it is no such block."""
    if isinstance(module, _AdoptedBlock):
        return None, "already fused"
    if not all(hasattr(module, a) for a in _BLOCK_ATTRIBUTES):
        return None, None
    if all(hasattr(module, a) for a in _METAFORMER_ATTRIBUTES):
        fused_class, check_layout = FusedMetaFormerBlock, _check_metaformer_layout
    elif all(hasattr(module, a) for a in _ORIGINAL_ATTRIBUTES):
        fused_class, check_layout = FusedPoolFormerBlock, _check_original_layout
    else:
        return None, "unknown block layout (neither MetaFormerBlock nor PoolFormerBlock attributes)"
    layout, norm_reason = _norm_layout(module)
    reason = (_check_mixer(module) or norm_reason or check_layout(module, layout)
              or _check_hooks(module, fused_class))
    return (None, reason) if reason else (fused_class, None)


def _check_metaformer_layout(block, layout: str) -> Optional[str]:
    c = _channels(block.norm1)
    return (_check_drop_path(block.drop_path1, "drop_path1")
            or _check_scale(block.layer_scale1, "layer_scale1", c, layout)
            or _check_scale(block.res_scale1, "res_scale1", c, layout))


def _check_original_layout(block, layout: str) -> Optional[str]:
    if layout != "NCHW":
        return f"norm1 is {_type_name(block.norm1)}: the PoolFormerBlock layout is served with a GroupNorm only"
    reason = _check_drop_path(block.drop_path, "drop_path")
    if reason or not block.use_layer_scale:
        return reason
    scale = getattr(block, "layer_scale_1", None)
    if not isinstance(scale, nn.Parameter) or tuple(scale.shape) != (_channels(block.norm1),):
        return "use_layer_scale is set but layer_scale_1 is not a (C,) Parameter"
    return None


def _convert_children(parent: nn.Module, prefix: str, backend: str, report: ConversionReport) -> None:
    for name, child in list(parent.named_children()):
        qualified = f"{prefix}.{name}" if prefix else name
        replacement = _convert_one(child, qualified, backend, report)
        if replacement is not None:
            setattr(parent, name, replacement)


def _convert_one(module: nn.Module, name: str, backend: str, report: ConversionReport) -> Optional[nn.Module]:
    """The fused replacement of ``module`` (or None), descending into non-block modules."""
    fused_class, reason = check_block(module)
    if fused_class is not None:
        report.converted.append(name)
        return fused_class.from_block(module, backend)
    if reason is not None:
        report.skipped.append((name, reason))
    else:
        _convert_children(module, name, backend, report)
    return None


def convert_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace every supported PoolFormer / MetaFormer pooling block with its fused twin.

    Args:
        model: any ``nn.Module``; blocks are found anywhere in its tree (``model`` may
            itself be a block).
        backend: the ``pool_mixer`` backend the fused blocks use ("auto", "cpu",
            "cuda", "triton", "reference").
        inplace: convert ``model`` itself -- its parameters stay the same objects, so an
            optimizer built before the conversion keeps working.  Otherwise a deep copy
            is converted and ``model`` is left untouched.

    Returns:
        The converted model (``model`` itself when ``inplace``, unless ``model`` is a
        block, which is replaced by a new module).  ``state_dict()`` keys, order and
        values are unchanged.  What was converted and what was skipped, and why, is in
        ``returned.fused_poolformer_report`` (a :class:`ConversionReport`) and logged.
    """
    _check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    replacement = _convert_one(model, "", backend, report)
    if replacement is not None:
        model = replacement
    model.fused_poolformer_report = report
    logger.info("%s", report)
    return model
