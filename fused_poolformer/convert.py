"""Swap fused blocks into existing PoolFormer / MetaFormer models.

``convert_model(model)`` walks the module tree and replaces every block it can serve
with its fused twin (``fused_poolformer.modules``):

- timm's ``MetaFormerBlock`` with a ``Pooling`` token mixer (every ``poolformer_*`` and
  ``poolformerv2_*``, and the pooling stages of hybrid MetaFormers) becomes a
  :class:`~fused_poolformer.modules.FusedMetaFormerBlock`;
- the original PoolFormer repository's ``PoolFormerBlock`` becomes a
  :class:`~fused_poolformer.modules.FusedPoolFormerBlock`.

Blocks are recognised by structure -- attribute names, norm type, pool settings, the
class names of the small scale / drop-path / mixer modules -- without importing timm or
the PoolFormer repository.  Anything that looks like a MetaFormer block (it has
``norm1``, ``token_mixer``, ``norm2`` and ``mlp``) but that the fused op does not cover
(another token mixer, a LayerNorm / BatchNorm, pool settings other than stride 1,
padding k//2, count_include_pad=False, odd k) is left as it is and reported.

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
_TIMM_ATTRIBUTES = ("drop_path1", "layer_scale1", "res_scale1", "drop_path2", "layer_scale2", "res_scale2")
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


def _check_norm(block) -> Optional[str]:
    norm = block.norm1
    if not isinstance(norm, nn.GroupNorm):
        return f"norm1 is {_type_name(norm)}, not a GroupNorm"
    return None


def _check_scale(module, name: str, channels: int) -> Optional[str]:
    """Identity, timm ``Scale`` (NCHW) or ``LayerScale2d`` over ``channels``."""
    if isinstance(module, nn.Identity):
        return None
    kind = _type_name(module)
    if kind == "Scale":
        vector, broadcast_ok = getattr(module, "scale", None), tuple(getattr(module, "shape", ())) == (channels, 1, 1)
    elif kind == "LayerScale2d":
        vector, broadcast_ok = getattr(module, "gamma", None), True
    else:
        return f"{name} is {kind}, not Identity, Scale or LayerScale2d"
    if not isinstance(vector, nn.Parameter) or tuple(vector.shape) != (channels,) or not broadcast_ok:
        return f"{name} does not scale the {channels} channels of an NCHW tensor"
    return None


def _check_drop_path(module, name: str) -> Optional[str]:
    if isinstance(module, nn.Identity) or (_type_name(module) == "DropPath" and hasattr(module, "drop_prob")):
        return None
    return f"{name} is {_type_name(module)}, not Identity or DropPath"


def _first_failure(*reasons) -> Optional[str]:
    return next((r for r in reasons if r is not None), None)


def check_block(module: nn.Module) -> Tuple[Optional[Type[_AdoptedBlock]], Optional[str]]:
    """(fused class, None) where ``module`` can be converted, (None, reason) where it is a
    MetaFormer-like block that cannot, and (None, None) where it is no such block."""
    if isinstance(module, _AdoptedBlock):
        return None, "already fused"
    if not all(hasattr(module, a) for a in _BLOCK_ATTRIBUTES):
        return None, None
    if all(hasattr(module, a) for a in _TIMM_ATTRIBUTES):
        fused_class, layout_reason = FusedMetaFormerBlock, _check_timm_layout(module)
    elif all(hasattr(module, a) for a in _ORIGINAL_ATTRIBUTES):
        fused_class, layout_reason = FusedPoolFormerBlock, _check_original_layout(module)
    else:
        return None, "unknown block layout (neither timm MetaFormerBlock nor PoolFormerBlock attributes)"
    reason = _first_failure(_check_mixer(module), _check_norm(module), layout_reason)
    return (None, reason) if reason else (fused_class, None)


def _channels(block) -> Optional[int]:
    return getattr(block.norm1, "num_channels", None)


def _check_timm_layout(block) -> Optional[str]:
    c = _channels(block)
    return _first_failure(
        _check_drop_path(block.drop_path1, "drop_path1"),
        _check_scale(block.layer_scale1, "layer_scale1", c),
        _check_scale(block.res_scale1, "res_scale1", c),
    )


def _check_original_layout(block) -> Optional[str]:
    reason = _check_drop_path(block.drop_path, "drop_path")
    if reason or not block.use_layer_scale:
        return reason
    scale = getattr(block, "layer_scale_1", None)
    if not isinstance(scale, nn.Parameter) or tuple(scale.shape) != (_channels(block),):
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
