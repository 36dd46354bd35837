"""Drop-in ``nn.Module``s around the fused pool mixer.

- :class:`FusedPoolMixer`: the first residual branch of a PoolFormer block
  (GroupNorm -> pool - x -> layer scale -> drop path -> residual add) as one module, for
  building new models.
- :class:`FusedMetaFormerBlock` and :class:`FusedPoolFormerBlock`: replacements for a
  ``MetaFormerBlock`` with a ``Pooling`` token mixer -- timm's, on (N, C, H, W) tensors, or
  the official MetaFormer-baselines code's, on (N, H, W, C) tensors -- and for the original
  PoolFormer repository's ``PoolFormerBlock``.  They are made *from* an existing block
  (:meth:`from_block`) and adopt its submodules and parameters as they are -- same objects,
  same names, same order -- so ``state_dict()`` and optimizers are unaffected.  Only the
  token-mixer branch runs through :func:`fused_poolformer.pool_mixer`; the MLP branch is
  left to the block's own modules.

Drop path draws its per-sample mask with the same RNG calls as timm's ``DropPath``, so a
seeded training run gives the same result as the unfused model.

The modules the fused op stands in for (``norm1``, ``token_mixer``, the first branch's
drop path and scales, and their children) stay in the tree but are not called: a hook on
them does not fire.  ``convert_model`` therefore leaves a block holding such a hook
unfused; a hook registered on them after the conversion does not fire (register it
before converting, or on the block).  The blocks do not look for hooks at every call:
tools that hook every module while they run (fvcore, hook-based profilers) would switch
the fused path off while they measure it.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .ops import BACKENDS, pool_mixer

__all__ = ["FusedPoolMixer", "FusedMetaFormerBlock", "FusedPoolFormerBlock", "drop_path_scale"]


def drop_path_scale(x: Tensor, drop_prob: float, training: bool, scale_by_keep: bool = True) -> Optional[Tensor]:
    """The per-sample drop-path factor (N,) for ``x``, or None where drop path is inactive.

    Mirrors ``timm.layers.drop.drop_path`` call for call (same shape, dtype and RNG
    consumption) so that a seeded fused run draws the masks the unfused one draws.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return mask.view(x.shape[0])


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class FusedPoolMixer(nn.Module):
    """``res_scale * x + layer_scale * drop_path(Pool(GroupNorm(x)) - GroupNorm(x))`` in one op.

    ``weight`` and ``bias`` are named and shaped like ``nn.GroupNorm``'s, so a GroupNorm's
    affine parameters load into it directly.  ``layer_scale`` / ``res_scale`` are (dim,)
    Parameters when their init value is given and absent (None) otherwise.

    Args:
        dim: number of channels C.
        pool_size: odd AvgPool2d kernel (stride 1, padding pool_size // 2,
            count_include_pad=False).
        num_groups: GroupNorm groups (1 in every published PoolFormer).
        eps: GroupNorm epsilon.
        affine: GroupNorm has a weight.
        norm_bias: GroupNorm has a bias (PoolFormer v2 has none).  It cancels out of the
            output; its gradient is zero, as in the unfused graph.
        layer_scale_init_value: init value of ``layer_scale`` or None for no layer scale.
        res_scale_init_value: init value of ``res_scale`` or None for no residual scale.
        drop_path: drop-path (stochastic depth) probability, applied in training only.
        scale_by_keep: divide kept samples by the keep probability, as timm's DropPath.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see ``pool_mixer``).
    """

    def __init__(
        self,
        dim: int,
        pool_size: int = 3,
        num_groups: int = 1,
        eps: float = 1e-5,
        affine: bool = True,
        norm_bias: bool = True,
        layer_scale_init_value: Optional[float] = None,
        res_scale_init_value: Optional[float] = None,
        drop_path: float = 0.0,
        scale_by_keep: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"FusedPoolMixer: pool_size must be a positive odd integer, got {pool_size!r}")
        if dim % num_groups != 0:
            raise ValueError(f"FusedPoolMixer: num_groups ({num_groups}) must divide dim ({dim})")
        if not 0.0 <= drop_path <= 1.0:
            raise ValueError(f"FusedPoolMixer: drop_path must be in [0, 1], got {drop_path!r}")
        self.dim, self.pool_size, self.num_groups, self.eps = dim, pool_size, num_groups, eps
        self.drop_prob, self.scale_by_keep = drop_path, scale_by_keep
        self.backend = _check_backend(backend)

        def vector(init_value):
            return nn.Parameter(torch.full((dim,), float(init_value), device=device, dtype=dtype))

        self.weight = vector(1.0) if affine else None
        self.bias = vector(0.0) if affine and norm_bias else None
        self.layer_scale = None if layer_scale_init_value is None else vector(layer_scale_init_value)
        self.res_scale = None if res_scale_init_value is None else vector(res_scale_init_value)

    def forward(self, x: Tensor) -> Tensor:
        return pool_mixer(
            x, self.weight, self.bias,
            layer_scale=self.layer_scale,
            res_scale=self.res_scale,
            sample_scale=drop_path_scale(x, self.drop_prob, self.training, self.scale_by_keep),
            num_groups=self.num_groups, pool_size=self.pool_size, eps=self.eps, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, pool_size={self.pool_size}, num_groups={self.num_groups}, eps={self.eps}, "
            f"layer_scale={self.layer_scale is not None}, res_scale={self.res_scale is not None}, "
            f"drop_path={self.drop_prob}, backend={self.backend!r}"
        )


def _module_drop_path_scale(x: Tensor, module: nn.Module) -> Optional[Tensor]:
    """The factor an ``nn.Identity`` or a timm-style ``DropPath`` module would apply to
    ``x``'s branch.  Its settings are read at every call, so that a drop-path schedule
    that changes ``drop_prob`` during training keeps working."""
    if isinstance(module, nn.Identity):
        return None
    return drop_path_scale(x, module.drop_prob, module.training, getattr(module, "scale_by_keep", True))


def pool_size_of(token_mixer: nn.Module) -> int:
    kernel = token_mixer.pool.kernel_size
    return kernel if isinstance(kernel, int) else kernel[0]


def norm_arguments(norm: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor], int, float]:
    """(weight, bias, num_groups, eps) of a block's ``norm1`` as ``pool_mixer`` takes them.

    ``norm`` is an ``nn.GroupNorm`` or the MetaFormer-baselines ``LayerNormGeneral`` over
    (H, W, C) -- one group per sample -- whose ``use_scale`` / ``use_bias`` flags say
    whether its forward applies ``weight`` / ``bias``.
    """
    if isinstance(norm, nn.GroupNorm):
        return norm.weight, norm.bias, norm.num_groups, norm.eps
    weight = norm.weight if norm.use_scale else None
    bias = norm.bias if norm.use_bias else None
    return weight, bias, 1, norm.eps


class _AdoptedBlock(nn.Module):
    """Base of the fused blocks: built from an existing block, adopting its state.

    ``from_block`` copies the original's attribute dict, so submodules, parameters,
    buffers, flags and hooks are the same objects under the same names and in the same
    registration order (``state_dict()`` keys come out in the same order).  The
    containers are copied so that the original block is left intact.

    ``BYPASSED`` names the submodules the fused op stands in for: they stay in the tree
    (and in ``state_dict()``) but are not called, so hooks on them do not fire
    (``convert_model`` leaves a block whose bypassed modules hold hooks unfused).
    """

    BYPASSED: Tuple[str, ...] = ()
    layout = "NCHW"

    def _adopt(self, block: nn.Module, backend: str) -> None:
        for name, value in vars(block).items():
            self.__dict__[name] = type(value)(value) if isinstance(value, dict) else value
        self.pool_size = pool_size_of(block.token_mixer)
        self.backend = _check_backend(backend)

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto"):
        """The fused twin of ``block`` (which must pass ``convert.check_block``)."""
        fused = cls.__new__(cls)
        fused._adopt(block, backend)
        fused._read_settings()
        return fused

    def _read_settings(self) -> None:
        pass

    def _mix(self, x: Tensor, layer_scale: Optional[Tensor], res_scale: Optional[Tensor],
             drop_path: nn.Module) -> Tensor:
        """The token-mixer branch with its residual, in one fused op."""
        weight, bias, num_groups, eps = norm_arguments(self.norm1)
        return pool_mixer(
            x, weight, bias,
            layer_scale=layer_scale,
            res_scale=res_scale,
            sample_scale=_module_drop_path_scale(x, drop_path),
            num_groups=num_groups, pool_size=self.pool_size, eps=eps,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"fused token mixer: layout={self.layout}, pool_size={self.pool_size}, backend={self.backend!r}"


def scale_parameter_name(module: nn.Module) -> Optional[str]:
    """Name of the (C,) vector a per-channel scale module multiplies by; None for Identity.

    ``Scale`` keeps it in ``scale``, timm's ``LayerScale`` / ``LayerScale2d`` in ``gamma``.
    """
    if isinstance(module, nn.Identity):
        return None
    return "scale" if type(module).__name__ == "Scale" else "gamma"


class FusedMetaFormerBlock(_AdoptedBlock):
    """A ``MetaFormerBlock`` with a ``Pooling`` token mixer, its first branch fused.

    Serves timm's block (``layout`` "NCHW": (N, C, H, W) tensors, ``norm1`` a GroupNorm)
    and the official MetaFormer-baselines block (``layout`` "NHWC": (N, H, W, C) tensors,
    ``norm1`` a ``LayerNormGeneral`` over (H, W, C)).  An (N, H, W, C) tensor is handed to
    the fused op as its (N, C, H, W) permutation -- channels_last when the input is
    contiguous, so no copy is made -- and the result is permuted back.

    Keeps ``norm1``, ``token_mixer``, ``drop_path1``, ``layer_scale1``, ``res_scale1``,
    ``norm2``, ``mlp``, ``drop_path2``, ``layer_scale2``, ``res_scale2`` (``token_mixer``
    holds no parameters and is kept only so the module tree matches).
    """

    BYPASSED = ("norm1", "token_mixer", "drop_path1", "layer_scale1", "res_scale1")

    def _read_settings(self) -> None:
        self.layout = "NCHW" if isinstance(self.norm1, nn.GroupNorm) else "NHWC"
        self.layer_scale1_name = scale_parameter_name(self.layer_scale1)
        self.res_scale1_name = scale_parameter_name(self.res_scale1)

    def _vector(self, module: nn.Module, name: Optional[str]) -> Optional[Tensor]:
        return None if name is None else getattr(module, name)

    def token_mixer_branch(self, x: Tensor) -> Tensor:
        """``res_scale1(x) + layer_scale1(drop_path1(token_mixer(norm1(x))))``, fused."""
        if self.layout == "NHWC" and x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: x must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
        nchw = x.permute(0, 3, 1, 2) if self.layout == "NHWC" else x
        y = self._mix(
            nchw,
            layer_scale=self._vector(self.layer_scale1, self.layer_scale1_name),
            res_scale=self._vector(self.res_scale1, self.res_scale1_name),
            drop_path=self.drop_path1,
        )
        return y.permute(0, 2, 3, 1) if self.layout == "NHWC" else y

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer_branch(x)
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))


class FusedPoolFormerBlock(_AdoptedBlock):
    """The original PoolFormer repository's ``PoolFormerBlock``, its first branch fused.

    Keeps ``norm1``, ``token_mixer``, ``norm2``, ``mlp``, ``drop_path``,
    ``use_layer_scale`` and the bare Parameters ``layer_scale_1`` / ``layer_scale_2``
    (absent when ``use_layer_scale`` is False).
    """

    # drop_path serves both branches: a hook on it fires twice per call in the original.
    BYPASSED = ("norm1", "token_mixer", "drop_path")

    def token_mixer_branch(self, x: Tensor) -> Tensor:
        """``x + drop_path(layer_scale_1 * token_mixer(norm1(x)))``, fused."""
        layer_scale = self.layer_scale_1 if self.use_layer_scale else None
        return self._mix(x, layer_scale=layer_scale, res_scale=None, drop_path=self.drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer_branch(x)
        if self.use_layer_scale:
            return x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
