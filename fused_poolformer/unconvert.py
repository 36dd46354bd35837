"""Turn a converted model back into the unfused one: :func:`unconvert_model`.

Every fused block (``fused_poolformer.modules``: the mixer-level blocks, and any class
built on them with ``_AdoptedBlock._adopt``, e.g. the block-level modules) records the class
it replaced (``original_class``) and that block's attributes (``original_state``: names and
order, the entry names of its parameter / buffer / submodule registries, its plain public
attributes).  Unconverting builds an instance of the original class around the fused
block's *current* submodules, parameters and buffers -- the same objects, so trained
values, optimizers (``inplace=True``) and ``state_dict()`` carry over -- and drops what the
fused class added.  Nothing is re-initialised and no original ``__init__`` runs.
"""

import copy
import logging
from typing import Optional

from torch import nn

from .modules import REGISTRIES, _AdoptedBlock

__all__ = ["is_fused_block", "unconvert_block", "unconvert_model"]

logger = logging.getLogger("fused_poolformer")

def is_fused_block(module: nn.Module) -> bool:
    """Whether ``module`` is a fused block that :func:`unconvert_block` can turn back."""
    return isinstance(module, _AdoptedBlock) or isinstance(getattr(module, "original_class", None), type)


def unconvert_block(block: nn.Module) -> nn.Module:
    """The original block that ``block`` (a fused block) replaced, around the same
    submodules and parameters.  ``block`` itself is left as it is (its containers are
    copied, their entries shared)."""
    if not is_fused_block(block):
        raise TypeError(f"unconvert_block: block must be a fused block (one made by convert_model), "
                        f"got {type(block).__name__}")
    original_class = getattr(block, "original_class", None)
    if not (isinstance(original_class, type) and issubclass(original_class, nn.Module)):
        raise ValueError(f"unconvert_block: {type(block).__name__} does not record the class it replaced "
                         f"(original_class is {original_class!r}); it was not made by convert_model")
    current = vars(block)
    state: Optional[dict] = current.get("original_state")
    restored = original_class.__new__(original_class)
    if state is None:
        # A fused module that records only its original class: keep every attribute but
        # the record (registries included, as they are).
        names = [name for name in current if name != "original_class"]
        for name in names:
            restored.__dict__[name] = _copy_container(current[name])
        return restored
    values = state["values"]
    for name in state["names"]:
        if name in state["keys"]:  # a registry: the original's entries, with today's values
            registry = current.get(name, {})
            restored.__dict__[name] = type(registry)(
                (key, registry[key]) for key in state["keys"][name] if key in registry)
        elif name in values:  # plain public attributes, as the original had them
            restored.__dict__[name] = values[name]
        elif name in current:  # the mode, hooks, other nn.Module internals: the fused block's
            restored.__dict__[name] = _copy_container(current[name])
    buffers = restored.__dict__.get("_buffers", {})
    non_persistent = restored.__dict__.get("_non_persistent_buffers_set")
    if isinstance(non_persistent, set):
        restored.__dict__["_non_persistent_buffers_set"] = {name for name in non_persistent if name in buffers}
    return restored


def _copy_container(value):
    return type(value)(value) if isinstance(value, (dict, set)) else value


def unconvert_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every fused block of ``model`` with the block it was made from.

    The inverse of :func:`fused_poolformer.convert_model`, at every fusion level: each
    fused block becomes an instance of its original class (``original_class``) holding the
    fused block's current submodules, parameters and buffers under the original names and
    in the original order, so ``state_dict()`` is unchanged and the model computes the
    unfused graph again; hooks on the modules the fused op bypassed (``norm1``,
    ``token_mixer``, ...) fire again.  The original's plain attributes (flags such as
    ``use_layer_scale``) come back as they were when the block was converted; train / eval
    mode and hooks registered on the fused block itself are kept.

    Args:
        model: any ``nn.Module``; fused blocks are found anywhere in its tree (``model``
            may itself be one).  A model without fused blocks comes back unchanged.
        inplace: unconvert ``model`` itself -- parameters stay the same objects, so an
            optimizer keeps working.  Otherwise a deep copy is unconverted and ``model`` is
            left untouched.

    Returns:
        The unfused model (``model`` itself when ``inplace``, unless ``model`` is a fused
        block, which is replaced by a new module).  Its ``fused_poolformer_report`` (left
        by ``convert_model``) is removed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unconvert_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"unconvert_model: inplace must be a bool, got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    count = [0]
    if is_fused_block(model):
        model = unconvert_block(model)
        count[0] += 1
    _unconvert_children(model, count)
    model.__dict__.pop("fused_poolformer_report", None)
    logger.info("fused_poolformer: unconverted %d block(s)", count[0])
    return model


def _unconvert_children(parent: nn.Module, count: list) -> None:
    for name, child in list(parent.named_children()):
        if is_fused_block(child):
            child = unconvert_block(child)
            setattr(parent, name, child)
            count[0] += 1
        _unconvert_children(child, count)
