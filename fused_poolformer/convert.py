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
settings other than the pool rule of ``contract.pool_arguments``) is left as it is and reported with the first reason found.  So is a block holding a hook on a module
the fused op stands in for (``norm1``, ``token_mixer``, the first branch's drop path and
scales, or their children), so that the hook keeps firing.

The report is a :class:`ConversionReport`, attached to the returned model as
``model.fused_poolformer_report`` and logged (logger ``"fused_poolformer"``, level INFO).
"""

import copy
import dataclasses
import logging
from typing import Dict, List, Optional, Tuple, Type

from torch import nn

from . import backends, contract
from .block_modules import RECOMPUTE_CHOICES, BlockFusedMetaFormerBlock, BlockFusedPoolFormerBlock, activation_of
from .modules import FusedMetaFormerBlock, FusedPoolFormerBlock, _AdoptedBlock

__all__ = ["ConversionReport", "check_block", "check_block_level", "convert_model", "FUSE_LEVELS"]

# "block": the whole block in one operator pair where it qualifies (check_block_level), the
# mixer alone where not; "mixer": the token-mixer branch only.
FUSE_LEVELS = ("block", "mixer")
_BLOCK_LEVEL_CLASS = {FusedMetaFormerBlock: BlockFusedMetaFormerBlock, FusedPoolFormerBlock: BlockFusedPoolFormerBlock}

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
    # Each converted block's fusion level ("block" or "mixer"), and for a block fused at the
    # mixer level although fuse="block" was asked for, why.
    levels: Dict[str, str] = dataclasses.field(default_factory=dict)
    mixer_only: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        whole = sum(1 for level in self.levels.values() if level == "block")
        lines = [f"fused_poolformer: converted {len(self.converted)} block(s), skipped {len(self.skipped)} "
                 f"(fused whole: {whole}, token mixer only: {len(self.converted) - whole})"]
        lines += [f"  mixer only {name or '<model>'}: {reason}" for name, reason in self.mixer_only]
        lines += [f"  skipped {name or '<model>'}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _type_name(module) -> str:
    return type(module).__name__


def _check_pool(pool) -> Optional[str]:
    if not isinstance(pool, nn.AvgPool2d):
        return f"token_mixer.pool is {_type_name(pool)}, not AvgPool2d"
    return contract.avg_pool_mismatch(pool)


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


def _check_layer_norm_general(norm, name: str = "norm1") -> Optional[str]:
    """The MetaFormer-baselines ``LayerNormGeneral`` on (N, H, W, C): the fused op's
    GroupNorm(1) when it normalizes over (H, W, C) with (C,) affine vectors."""
    dims = tuple(getattr(norm, "normalized_dim", ()))
    if sorted(d % 4 for d in dims) != [1, 2, 3]:
        if dims in ((-1,), (3,)):
            return (f"{name} is a LayerNormGeneral over C only (statistics per position, as in "
                    "ConvFormer / CAFormer), not over (H, W, C) per sample")
        return f"{name} is a LayerNormGeneral over dims {dims}, not over (H, W, C) = (1, 2, 3)"
    lengths = set()
    for flag, vector in (("use_scale", "weight"), ("use_bias", "bias")):
        if getattr(norm, flag, None) is None:
            return f"{name} is a LayerNormGeneral without a {flag} flag"
        if getattr(norm, flag):
            length = _vector_length(getattr(norm, vector, None))
            if length is None:
                return f"{name}.{vector} is not a (C,) Parameter (it would not scale the channels of (N, H, W, C))"
            lengths.add(length)
    if len(lengths) > 1:
        return f"{name}.weight and {name}.bias differ in length"
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


# ---------------------------------------------------------------------------------------
# The whole block: what the block operator computes beyond the mixer.

_MLP_CHILDREN = {"fc1", "act", "fc2", "drop", "drop1", "drop2", "norm"}


def _check_norm2(block, layout: str, channels: Optional[int]) -> Optional[str]:
    norm1, norm2 = block.norm1, block.norm2
    if isinstance(norm1, nn.GroupNorm) and norm1.num_groups != 1:
        return f"norm1 has {norm1.num_groups} groups (the block operator takes GroupNorm with one group)"
    if layout == "NCHW":
        if not isinstance(norm2, nn.GroupNorm):
            return f"norm2 is {_type_name(norm2)}, not a GroupNorm"
        if norm2.num_groups != 1:
            return f"norm2 has {norm2.num_groups} groups (the block operator takes GroupNorm with one group)"
        if norm2.num_channels != channels:
            return f"norm2 has {norm2.num_channels} channels, norm1 {channels}"
        return None
    if _type_name(norm2) != "LayerNormGeneral":
        return f"norm2 is {_type_name(norm2)}, not a LayerNormGeneral over (H, W, C)"
    return _check_layer_norm_general(norm2, "norm2")


def _check_linear(fc, name: str, layout: str, in_features: int, out_features: Optional[int]) -> Optional[str]:
    if layout == "NCHW":
        if not isinstance(fc, nn.Conv2d) or fc.kernel_size != (1, 1) or fc.stride != (1, 1) or \
                fc.padding not in ((0, 0), "valid") or fc.dilation != (1, 1) or fc.groups != 1:
            return f"mlp.{name} is not a 1x1, stride 1, ungrouped Conv2d (got {fc!r})"
        shape = (fc.out_channels, fc.in_channels)
    else:
        if not isinstance(fc, nn.Linear):
            return f"mlp.{name} is {_type_name(fc)}, not a Linear"
        shape = (fc.out_features, fc.in_features)
    if shape[1] != in_features or (out_features is not None and shape[0] != out_features):
        return f"mlp.{name} maps {shape[1]} to {shape[0]} features, not {in_features} to {out_features or 'hidden'}"
    return None


def _check_mlp(mlp, layout: str, channels: Optional[int]) -> Optional[str]:
    children = dict(mlp.named_children())
    extra = sorted(set(children) - _MLP_CHILDREN)
    if extra or "fc1" not in children or "fc2" not in children or "act" not in children:
        return f"mlp ({_type_name(mlp)}) is not fc1 / act / fc2 with dropouts (children {sorted(children)})"
    if any(True for _ in mlp.parameters(recurse=False)):
        return "mlp holds parameters of its own"
    for name in ("drop", "drop1", "drop2"):
        drop = children.get(name)
        if drop is not None and not isinstance(drop, nn.Identity) and not (isinstance(drop, nn.Dropout) and drop.p == 0):
            return f"mlp.{name} is {drop!r} (dropout with p > 0 is not fused)"
    norm = children.get("norm")
    if norm is not None and not isinstance(norm, nn.Identity):
        return f"mlp.norm is {_type_name(norm)}, not Identity"
    reason = activation_of(mlp.act)[3]
    if reason:
        return reason
    reason = _check_linear(mlp.fc1, "fc1", layout, channels, None)
    hidden = mlp.fc1.out_channels if layout == "NCHW" else mlp.fc1.out_features
    return reason or _check_linear(mlp.fc2, "fc2", layout, hidden, channels)


def check_block_level(module: nn.Module, fused_class: Type[_AdoptedBlock], backend: str) -> Optional[str]:
    """None where ``module`` (which ``check_block`` accepted with ``fused_class``) can be fused
    whole, else why it stays at the mixer level."""
    if backend != "auto" and not backends.get(backend, "convert_model").has_family("block"):
        return f"backend {backend!r} has no block operators"
    layout, _ = _norm_layout(module)
    channels = _channels(module.norm1)
    block_class = _BLOCK_LEVEL_CLASS[fused_class]
    reason = _check_norm2(module, layout, channels) or _check_mlp(module.mlp, layout, channels)
    if reason is None and fused_class is FusedMetaFormerBlock:
        reason = (_check_drop_path(module.drop_path2, "drop_path2")
                  or _check_scale(module.layer_scale2, "layer_scale2", channels, layout)
                  or _check_scale(module.res_scale2, "res_scale2", channels, layout))
    if reason is None and fused_class is FusedPoolFormerBlock and module.use_layer_scale:
        scale = getattr(module, "layer_scale_2", None)
        if not isinstance(scale, nn.Parameter) or tuple(scale.shape) != (channels,):
            reason = "use_layer_scale is set but layer_scale_2 is not a (C,) Parameter"
    return reason or _check_hooks(module, block_class)


# ---------------------------------------------------------------------------------------
# The walk.


@dataclasses.dataclass
class _Options:
    backend: str
    fuse: str
    recompute: Optional[str]


def _convert_children(parent: nn.Module, prefix: str, options: _Options, report: ConversionReport) -> None:
    for name, child in list(parent.named_children()):
        qualified = f"{prefix}.{name}" if prefix else name
        replacement = _convert_one(child, qualified, options, report)
        if replacement is not None:
            setattr(parent, name, replacement)


def _convert_one(module: nn.Module, name: str, options: _Options, report: ConversionReport) -> Optional[nn.Module]:
    """The fused replacement of ``module`` (or None), descending into non-block modules."""
    fused_class, reason = check_block(module)
    if fused_class is not None:
        report.converted.append(name)
        if options.fuse == "block":
            level_reason = check_block_level(module, fused_class, options.backend)
            if level_reason is None:
                report.levels[name] = "block"
                fused = _BLOCK_LEVEL_CLASS[fused_class].from_block(module, options.backend)
                fused.set_recompute(options.recompute)
                return fused
            report.mixer_only.append((name, level_reason))
        report.levels[name] = "mixer"
        return fused_class.from_block(module, options.backend)
    if reason is not None:
        report.skipped.append((name, reason))
    else:
        _convert_children(module, name, options, report)
    return None


def convert_model(model: nn.Module, backend: str = "auto", inplace: bool = False, fuse: str = "block",
                  recompute: Optional[str] = None) -> nn.Module:
    """Replace every supported PoolFormer / MetaFormer pooling block with its fused twin.

    Args:
        model: any ``nn.Module``; blocks are found anywhere in its tree (``model`` may
            itself be a block).
        backend: the backend the fused blocks use ("auto", "cpu", "cuda", "triton",
            "reference", or one registered in ``fused_poolformer.backends``).
        fuse: "block" (default): a block whose MLP branch the block operator computes
            (``check_block_level``: GroupNorm(1) norms, fc1 / GELU or StarReLU / fc2 with
            dropout 0, no hooks on the bypassed modules) is fused whole, any other
            convertible block at the mixer level (the report says why); "mixer": the
            token-mixer branch only.
        recompute: for whole blocks, None (the backward reads fc1's saved output) or "mlp"
            (fc1's output is not saved and runs again in the backward: less memory).
        inplace: convert ``model`` itself -- its parameters stay the same objects, so an
            optimizer built before the conversion keeps working.  Otherwise a deep copy
            is converted and ``model`` is left untouched.

    Returns:
        The converted model (``model`` itself when ``inplace``, unless ``model`` is a
        block, which is replaced by a new module).  ``state_dict()`` keys, order and
        values are unchanged.  What was converted and what was skipped, and why, is in
        ``returned.fused_poolformer_report`` (a :class:`ConversionReport`) and logged.
    """
    backends.check_name(backend, "convert_model")
    if fuse not in FUSE_LEVELS:
        raise ValueError(f"convert_model: fuse must be one of {FUSE_LEVELS}, got {fuse!r}")
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"convert_model: recompute must be one of {RECOMPUTE_CHOICES}, got {recompute!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    replacement = _convert_one(model, "", _Options(backend, fuse, recompute), report)
    if replacement is not None:
        model = replacement
    model.fused_poolformer_report = report
    logger.info("%s", report)
    return model
