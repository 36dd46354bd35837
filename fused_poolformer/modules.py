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

Tooling (docs/deploy.md): the fused op is an fx leaf (``torch.fx.wrap`` of ``pool_mixer``
and ``drop_path_scale`` below), so ``torch.fx.symbolic_trace`` and fx-based feature
extractors keep it as one ``call_function`` node; under ``torch.jit.script`` the modules
call the C++ operator through ``torch.ops.fused_poolformer`` (``_scripted_pool_mixer``),
whose autograd is registered in C++ (a subclass with a forward of its own scripts where
that forward does: ``if torch.jit.is_scripting(): ...`` with the Python path in a
``@torch.jit.unused`` method, as ``token_mixer_branch`` does).  Every fused block records
the class it replaced
(``original_class``) and the original's attributes, which is what
``fused_poolformer.unconvert_model`` restores.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, contract
from .ops import pool_mixer

__all__ = ["FusedPoolMixer", "FusedMetaFormerBlock", "FusedPoolFormerBlock", "drop_path_scale"]


def drop_path_scale(x: Tensor, drop_prob: float, training: bool, scale_by_keep: bool = True) -> Optional[Tensor]:
    """The per-sample drop-path factor (N,) for ``x``, or None where drop path is inactive.

    Mirrors ``timm.layers.drop.drop_path`` call for call (same shape, dtype and RNG
    consumption) so that a seeded fused run draws the masks the unfused one draws.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return mask.view([x.shape[0]])


# fx leaves: ``torch.fx.symbolic_trace`` (and the fx feature extractors of torchvision and
# timm) records each call of these two from this module as one ``call_function`` node
# instead of tracing into them, which a Proxy cannot do (the C++ entry of ``pool_mixer``
# needs real tensors).  They run unchanged when the traced graph is called.
torch.fx.wrap("pool_mixer")
torch.fx.wrap("drop_path_scale")

# What TorchScript can reach: the C++ operators (through torch.ops) and the unfused graph.
SCRIPTABLE_BACKENDS = ("auto", "cpu", "cuda", "reference")


def _scripted_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], layer_scale: Optional[Tensor],
                        res_scale: Optional[Tensor], sample_scale: Optional[Tensor], num_groups: int, pool_size: int,
                        eps: float) -> Tensor:
    """``fused_poolformer.reference.pool_mixer`` in TorchScript (the ``reference`` backend)."""
    dt = x.dtype
    if weight is None and bias is not None:
        weight = torch.ones_like(bias)
    normed = F.group_norm(x, num_groups, None if weight is None else weight.to(dt),
                          None if bias is None else bias.to(dt), eps)
    # The pool rule of contract.pool_arguments (TorchScript compiles contract.pool_radius).
    pooled = F.avg_pool2d(normed, pool_size, 1, contract.pool_radius(pool_size), False, False)
    mixed = pooled - normed
    if layer_scale is not None:
        mixed = mixed * layer_scale.to(dt).view(1, -1, 1, 1)
    if sample_scale is not None:
        mixed = mixed * sample_scale.to(dt).view(-1, 1, 1, 1)
    if res_scale is not None:
        return x * res_scale.to(dt).view(1, -1, 1, 1) + mixed
    return x + mixed


def _scripted_pool_mixer(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], layer_scale: Optional[Tensor],
                         res_scale: Optional[Tensor], sample_scale: Optional[Tensor], num_groups: int,
                         pool_size: int, eps: float, backend: str) -> Tensor:
    """``pool_mixer`` as the scripted modules call it: the C++ forward operator through
    torch.ops (its autograd is registered in C++), or the unfused graph for the
    ``reference`` backend.  ``__prepare_scriptable__`` of the modules refuses the other
    backends before scripting starts."""
    if backend == "reference":
        return _scripted_reference(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)
    if backend == "cpu" and not x.is_cpu:
        raise ValueError("pool_mixer: backend='cpu' cannot serve a tensor on " + str(x.device))
    if backend == "cuda" and not x.is_cuda:
        raise ValueError("pool_mixer: backend='cuda' cannot serve a tensor on " + str(x.device))
    if x.is_cuda and not backends.HAS_CUDA_KERNELS:
        raise RuntimeError("pool_mixer: the extension was built without CUDA kernels, and a scripted module "
                           "reaches the C++ operators only (script a model converted with backend='reference')")
    return torch.ops.fused_poolformer.pool_mixer_forward(
        x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps)[0]


def _check_scriptable(module: nn.Module, backend: str) -> None:
    """Before ``torch.jit.script`` compiles a fused module: a clear error where the scripted
    path cannot serve it (instead of TorchScript's own about an unknown operator)."""
    who = type(module).__name__
    if backend not in SCRIPTABLE_BACKENDS:
        raise RuntimeError(
            f"{who}: backend={backend!r} cannot be scripted: under torch.jit.script the fused modules reach "
            f"the C++ operators (backend 'auto', 'cpu', 'cuda') and the unfused graph ('reference') only; "
            f"convert with one of {SCRIPTABLE_BACKENDS}, or use torch.jit.trace / torch.export")
    if backend != "reference" and backends.EXTENSION_ERROR is not None:
        raise RuntimeError(f"{who}: cannot be scripted with backend={backend!r}: the compiled operators did not load "
                           f"({backends.EXTENSION_ERROR}); convert with backend='reference'")


class FusedPoolMixer(nn.Module):
    """``res_scale * x + layer_scale * drop_path(Pool(GroupNorm(x)) - GroupNorm(x))`` in one op.

    ``weight`` and ``bias`` are named and shaped like ``nn.GroupNorm``'s, so a GroupNorm's
    affine parameters load into it directly.  ``layer_scale`` / ``res_scale`` are (dim,)
    Parameters when their init value is given and absent (None) otherwise.

    Args:
        dim: number of channels C.
        pool_size: odd AvgPool2d kernel (the pool rule of ``contract.pool_arguments``).
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
        contract.check_pool_size(pool_size, "FusedPoolMixer")
        if dim % num_groups != 0:
            raise ValueError(f"FusedPoolMixer: num_groups ({num_groups}) must divide dim ({dim})")
        if not 0.0 <= drop_path <= 1.0:
            raise ValueError(f"FusedPoolMixer: drop_path must be in [0, 1], got {drop_path!r}")
        self.dim, self.pool_size, self.num_groups, self.eps = dim, pool_size, num_groups, eps
        self.drop_prob, self.scale_by_keep = drop_path, scale_by_keep
        self.backend = backends.check_name(backend, "FusedPoolMixer")

        def vector(init_value):
            return nn.Parameter(torch.full((dim,), float(init_value), device=device, dtype=dtype))

        self.weight = vector(1.0) if affine else None
        self.bias = vector(0.0) if affine and norm_bias else None
        self.layer_scale = None if layer_scale_init_value is None else vector(layer_scale_init_value)
        self.res_scale = None if res_scale_init_value is None else vector(res_scale_init_value)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return _scripted_pool_mixer(
                x, self.weight, self.bias, self.layer_scale, self.res_scale,
                drop_path_scale(x, self.drop_prob, self.training, self.scale_by_keep),
                self.num_groups, self.pool_size, self.eps, self.backend)
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        sample_scale = None
        if self.drop_prob != 0.0 and self.training:  # keeps an eval-mode fx graph free of the call
            sample_scale = drop_path_scale(x, self.drop_prob, self.training, self.scale_by_keep)
        return pool_mixer(
            x, self.weight, self.bias,
            layer_scale=self.layer_scale,
            res_scale=self.res_scale,
            sample_scale=sample_scale,
            num_groups=self.num_groups, pool_size=self.pool_size, eps=self.eps, backend=self.backend,
        )

    def __prepare_scriptable__(self):
        _check_scriptable(self, self.backend)
        return self

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
    if isinstance(module, nn.Identity) or module.drop_prob == 0.0 or not module.training:
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


# The registries of nn.Module: an original block's entries are restored by name.
REGISTRIES = ("_parameters", "_buffers", "_modules")


def original_state(block: nn.Module) -> dict:
    """What a fused block records of the ``block`` it replaces, for ``unconvert_model``:
    ``names``, its attribute names in order; ``keys``, the entry names of each registry
    (parameters, buffers, submodules: the values are read from the fused block when it is
    turned back, so they are the trained ones); ``values``, its plain public attributes
    (flags, settings), which a fused class may shadow with attributes of its own."""
    attributes = vars(block)
    return {
        "names": tuple(attributes),
        "keys": {name: tuple(attributes[name]) for name in REGISTRIES if name in attributes},
        "values": {name: value for name, value in attributes.items()
                   if not name.startswith("_") and name != "training" and not isinstance(value, (dict, set))},
    }


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
            self.__dict__[name] = type(value)(value) if isinstance(value, (dict, set)) else value
        # What unconvert_model needs to rebuild the original around the same submodules
        # and parameters: its class, and its attributes (see original_state).
        self.original_class = type(block)
        self.original_state = original_state(block)
        self.pool_size = pool_size_of(block.token_mixer)
        self.backend = backends.check_name(backend, type(self).__name__)

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto"):
        """The fused twin of ``block`` (which must pass ``convert.check_block``)."""
        fused = cls.__new__(cls)
        fused._adopt(block, backend)
        fused._read_settings()
        return fused

    def _read_settings(self) -> None:
        pass

    @torch.jit.unused
    def _mix(self, x: Tensor, layer_scale: Optional[Tensor], res_scale: Optional[Tensor],
             drop_path: nn.Module) -> Tensor:
        """The token-mixer branch with its residual, in one fused op (eager, fx, torch.compile
        and torch.export; ``_scripted_mix`` is its TorchScript twin)."""
        weight, bias, num_groups, eps = norm_arguments(self.norm1)
        return pool_mixer(
            x, weight, bias,
            layer_scale=layer_scale,
            res_scale=res_scale,
            sample_scale=_module_drop_path_scale(x, drop_path),
            num_groups=num_groups, pool_size=self.pool_size, eps=eps,
            backend=self.backend,
        )

    def _scripted_mix(self, x: Tensor, layer_scale: Optional[Tensor], res_scale: Optional[Tensor],
                      sample_scale: Optional[Tensor]) -> Tensor:
        """``_mix`` under TorchScript, with ``norm_arguments`` written out: ``hasattr`` on a
        submodule is decided when the block is compiled, so each branch is compiled only
        for the norm it reads."""
        weight: Optional[Tensor] = None
        bias: Optional[Tensor] = None
        num_groups = 1
        if hasattr(self.norm1, "use_scale"):  # LayerNormGeneral over (H, W, C): one group
            if self.norm1.use_scale:
                weight = self.norm1.weight
            if self.norm1.use_bias:
                bias = self.norm1.bias
        else:  # nn.GroupNorm
            weight = self.norm1.weight
            bias = self.norm1.bias
            num_groups = self.norm1.num_groups
        return _scripted_pool_mixer(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                                    self.pool_size, self.norm1.eps, self.backend)

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` on each module before it compiles it: refuses the
        backends TorchScript cannot reach, naming the block.  (It returns the block itself:
        torch.jit.script puts what this returns into the parent module, the eager model.)"""
        _check_scriptable(self, self.backend)
        return self

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
        if torch.jit.is_scripting():
            return self._scripted_token_mixer_branch(x)
        return self._token_mixer_branch(x)

    @torch.jit.unused
    def _token_mixer_branch(self, x: Tensor) -> Tensor:
        # (fx: a Proxy has no number of dimensions to check; the op checks it when the graph runs)
        if self.layout == "NHWC" and not isinstance(x, torch.fx.Proxy) and x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: x must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
        nchw = x.permute(0, 3, 1, 2) if self.layout == "NHWC" else x
        y = self._mix(
            nchw,
            layer_scale=self._vector(self.layer_scale1, self.layer_scale1_name),
            res_scale=self._vector(self.res_scale1, self.res_scale1_name),
            drop_path=self.drop_path1,
        )
        return y.permute(0, 2, 3, 1) if self.layout == "NHWC" else y

    def _scripted_token_mixer_branch(self, x: Tensor) -> Tensor:
        nhwc = self.layout == "NHWC"
        if nhwc:
            if x.dim() != 4:
                raise ValueError("FusedMetaFormerBlock: x must be 4-D (N, H, W, C)")
            x = x.permute(0, 3, 1, 2)
        # The vectors of the scale modules (scale_parameter_name) and the drop-path factor
        # (_module_drop_path_scale); hasattr is decided at compile time.
        layer_scale: Optional[Tensor] = None
        if hasattr(self.layer_scale1, "scale"):
            layer_scale = self.layer_scale1.scale
        elif hasattr(self.layer_scale1, "gamma"):
            layer_scale = self.layer_scale1.gamma
        res_scale: Optional[Tensor] = None
        if hasattr(self.res_scale1, "scale"):
            res_scale = self.res_scale1.scale
        elif hasattr(self.res_scale1, "gamma"):
            res_scale = self.res_scale1.gamma
        sample_scale: Optional[Tensor] = None
        if hasattr(self.drop_path1, "drop_prob"):
            scale_by_keep = True
            if hasattr(self.drop_path1, "scale_by_keep"):
                scale_by_keep = self.drop_path1.scale_by_keep
            sample_scale = drop_path_scale(x, self.drop_path1.drop_prob, self.drop_path1.training, scale_by_keep)
        y = self._scripted_mix(x, layer_scale, res_scale, sample_scale)
        if nhwc:
            return y.permute(0, 2, 3, 1)
        return y

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
        if torch.jit.is_scripting():
            return self._scripted_token_mixer_branch(x)
        return self._token_mixer_branch(x)

    @torch.jit.unused
    def _token_mixer_branch(self, x: Tensor) -> Tensor:
        layer_scale = self.layer_scale_1 if self.use_layer_scale else None
        return self._mix(x, layer_scale=layer_scale, res_scale=None, drop_path=self.drop_path)

    def _scripted_token_mixer_branch(self, x: Tensor) -> Tensor:
        # (As the original's forward, this compiles only where use_layer_scale is True.)
        layer_scale: Optional[Tensor] = None
        if self.use_layer_scale:
            layer_scale = self.layer_scale_1
        sample_scale: Optional[Tensor] = None
        if hasattr(self.drop_path, "drop_prob"):
            scale_by_keep = True
            if hasattr(self.drop_path, "scale_by_keep"):
                scale_by_keep = self.drop_path.scale_by_keep
            sample_scale = drop_path_scale(x, self.drop_path.drop_prob, self.drop_path.training, scale_by_keep)
        return self._scripted_mix(x, layer_scale, None, sample_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer_branch(x)
        if self.use_layer_scale:
            return x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
