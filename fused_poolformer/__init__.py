"""fused_poolformer: the PoolFormer token mixer (GroupNorm -> pool - x -> layer scale ->
residual), and the whole block around it (Norm2 -> fc1 -> activation -> fc2 -> layer scale
-> residual), each fused into one forward and one backward operator, with CPU, CUDA and
Triton kernels and drop-in modules for MetaFormer-family models."""

from . import backends, reference
from .backends import Backend, register_backend
from .block_modules import BlockFusedMetaFormerBlock, BlockFusedPoolFormerBlock
from .convert import ConversionReport, convert_model
from .unconvert import unconvert_model
from .modules import FusedMetaFormerBlock, FusedPoolFormerBlock, FusedPoolMixer
from .onnx_export import onnx_translation_table
from .ops import (
    BACKENDS,
    EXTENSION_ERROR,
    HAS_CPU_KERNELS,
    HAS_CUDA_KERNELS,
    available_backends,
    pool_mixer,
    poolformer_block,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BlockFusedMetaFormerBlock",
    "BlockFusedPoolFormerBlock",
    "EXTENSION_ERROR",
    "ConversionReport",
    "FusedMetaFormerBlock",
    "FusedPoolFormerBlock",
    "FusedPoolMixer",
    "convert_model",
    "HAS_CPU_KERNELS",
    "HAS_CUDA_KERNELS",
    "onnx_translation_table",
    "available_backends",
    "backends",
    "pool_mixer",
    "poolformer_block",
    "reference",
    "register_backend",
    "triton_available",
]
__version__ = "0.1.0"
