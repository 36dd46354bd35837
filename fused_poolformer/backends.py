"""The backends: one record each, and the one place that decides which serves a call.

A backend is a named set of operators with the contract of ``fused_poolformer.contract``
(docs/contract.md), for one operator family after another: ``"pool_mixer"`` (the token
mixer) and ``"block"`` (the whole block, ``fused_poolformer.block_contract``), each a
forward and a backward operator; a backend may lack a family (Triton's block operators come
from the compiled extension: the same composition over the Triton mixer).
Everything that lists, checks or picks backends --
``pool_mixer``, the modules, ``convert_model``, the MAC counters, the tests and the
benchmark -- reads the records here, so adding a backend is a record and the backend's own
files (docs/backends.md, "Adding a backend"):

    register_backend(Backend(
        name="mydevice", devices=("cuda",), summary="...",
        unavailable_reason=lambda device: None if ... else "why not",
        load_operators=lambda: {"pool_mixer": (my_forward_op, my_backward_op)},
        checks_in_python=True))

The built-in ones, in the order ``backend="auto"`` tries them for a device:

- ``cpu``: the C++ kernels (csrc/cpu) of the compiled extension ``fused_poolformer._C``;
- ``cuda``: its CUDA kernels (csrc/cuda);
- ``triton``: the Triton kernels (``fused_poolformer.triton``, imported on first use);
- ``reference``: the unfused PyTorch graph (``fused_poolformer.reference``), everywhere.

The compiled extension is loaded here, once; if it fails to load (built against another
torch, a missing ``.so``) the package warns and ``EXTENSION_ERROR`` holds the exception.
"""

import dataclasses
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import block_contract, contract

try:
    from . import _C  # loading it registers torch.ops.fused_poolformer.*

    EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = exc
    warnings.warn(
        f"fused_poolformer: the compiled operators failed to load ({exc}); the 'cpu' and 'cuda' "
        "backends are unavailable and backend='auto' falls back to the slow unfused graph. "
        "Rebuild against the installed torch: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )

# (forward, backward): operators (or, for the reference, functions) of a family's contract.
OperatorPair = Tuple[Callable, Callable]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend.

    Attributes:
        name: what users pass as ``backend=``.
        devices: the device types whose tensors it can serve ("cpu", "cuda").
        summary: one line for tables and messages.
        unavailable_reason: device type -> None where it serves that device in this
            process, else why not (shown in errors and test skips).
        load_operators: -> {family: (forward, backward)}; called on first use (so a
            backend may import its kernels lazily) and cached.
        checks_in_python: whether ``pool_mixer`` checks the arguments in Python before
            calling the forward (backends without a C++ prologue of their own).
        auto_devices: the device types for which ``backend="auto"`` may pick it (backends
            are tried in registration order); None: all of ``devices``.
        fused: whether it runs fused kernels (False for the unfused reference graph).
        interpreted_devices: device types it serves only through an interpreter or an
            emulator (Triton on the CPU): correct there, too slow to time or to sweep.
    """

    name: str
    devices: Tuple[str, ...]
    summary: str
    unavailable_reason: Callable[[str], Optional[str]]
    load_operators: Callable[[], Dict[str, OperatorPair]]
    checks_in_python: bool
    auto_devices: Optional[Tuple[str, ...]] = None
    fused: bool = True
    interpreted_devices: Tuple[str, ...] = ()

    def serves(self, device: str) -> bool:
        """Whether it can serve tensors on ``device`` in this process."""
        return self.unavailable_reason(torch.device(device).type) is None

    def picked_by_auto(self, device_type: str) -> bool:
        return device_type in (self.devices if self.auto_devices is None else self.auto_devices)

    def operators(self, family: str = "pool_mixer") -> OperatorPair:
        """(forward, backward) of ``family``, loading the backend on first use."""
        loaded = _LOADED.get(self.name)
        if loaded is None:
            loaded = _LOADED[self.name] = self.load_operators()
        if family not in loaded:
            raise NotImplementedError(f"backend {self.name!r} has no {family} operators")
        return loaded[family]

    def has_family(self, family: str) -> bool:
        """Whether it has ``family`` operators ("pool_mixer", "block"), loading it on first use."""
        loaded = _LOADED.get(self.name)
        if loaded is None:
            loaded = _LOADED[self.name] = self.load_operators()
        return family in loaded


_REGISTRY: Dict[str, Backend] = {}
# Loaded operators by backend name: a plain dict (torch.compile ignores functools caches and
# would trace a cached function's body).
_LOADED: Dict[str, Dict[str, OperatorPair]] = {}


def register_backend(backend: Backend) -> Backend:
    """Adds (or replaces) a backend; returns it."""
    if not backend.name or backend.name == "auto":
        raise ValueError(f"register_backend: a backend needs a name other than 'auto', got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    _LOADED.pop(backend.name, None)
    return backend


def unregister_backend(name: str) -> None:
    """Removes a backend registered with :func:`register_backend` (tests)."""
    _REGISTRY.pop(name, None)
    _LOADED.pop(name, None)


def names() -> Tuple[str, ...]:
    """Every value ``backend=`` accepts: "auto" and the registered backends."""
    return ("auto",) + tuple(_REGISTRY)


def get(name: str, who: str = "pool_mixer") -> Backend:
    """The backend called ``name``; ValueError naming the choices otherwise."""
    backend = _REGISTRY.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(f"{who}: backend must be one of {names()}, got {name!r}")
    return backend


def check_name(name: str, who: str = "pool_mixer") -> str:
    """``name`` if ``backend=name`` is accepted, else the ValueError of :func:`get`."""
    if name != "auto":
        get(name, who)
    return name


def all_backends() -> List[Backend]:
    return list(_REGISTRY.values())


def operator_name(op) -> Optional[str]:
    """The qualified name ("namespace::name") of a torch.library operator, None for a plain
    function."""
    if isinstance(op, torch._ops.OpOverload):
        return op.name()
    return getattr(op, "_qualname", None)  # torch.library.custom_op / triton_op


def fused_operator_names(family: str = "pool_mixer") -> Tuple[List[str], List[str]]:
    """(forward names, backward names) of the ``family`` operators of every fused backend
    that serves some device in this process (loading them registers them with torch.ops)."""
    forwards: List[str] = []
    backwards: List[str] = []
    for backend in _REGISTRY.values():
        if not backend.fused or not any(backend.serves(d) for d in backend.devices):
            continue
        if not backend.has_family(family):
            continue
        for op, names in zip(backend.operators(family), (forwards, backwards)):
            name = operator_name(op)
            if name is not None and name not in names:
                names.append(name)
    return forwards, backwards


def available_backends(device: str = "cpu") -> List[str]:
    """Backends that can serve tensors on ``device`` ("cpu" or "cuda") in this process."""
    return [b.name for b in _REGISTRY.values() if b.serves(device)]


def choose(name: str, x: Tensor, who: str = "pool_mixer", family: str = "pool_mixer") -> Backend:
    """The backend that will serve ``x``: ``name``'s, or for "auto" the first that serves
    x's device with ``family`` operators; a clear error where the one asked for cannot."""
    device = x.device.type
    if name == "auto":
        for backend in _REGISTRY.values():
            if (backend.picked_by_auto(device) and backend.unavailable_reason(device) is None
                    and backend.has_family(family)):
                return backend
        raise ValueError(f"{who}: no backend serves a tensor on {x.device}")
    backend = get(name, who)
    if family != "pool_mixer" and backend.unavailable_reason(device) is None and not backend.has_family(family):
        raise ValueError(f"{who}: backend={name!r} has no {family} operators (backends with them: "
                         f"{[b.name for b in _REGISTRY.values() if b.has_family(family)]})")
    if device not in backend.devices:
        raise ValueError(f"{who}: backend={name!r} cannot serve a tensor on {x.device} "
                         f"(it serves {' and '.join(backend.devices)} tensors)")
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{who}: backend={name!r} is unavailable for {device} tensors: {reason}")
    return backend


# ---------------------------------------------------------------------------------------
# The built-in backends.


def _has_kernel(dispatch_key: str) -> bool:
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_poolformer::pool_mixer_forward", dispatch_key)


# Decided once at import, so that torch.compile sees constants.
HAS_CPU_KERNELS = _has_kernel("CPU")
HAS_CUDA_KERNELS = _has_kernel("CUDA")


def _cpp_unavailable(kind: str, device: str, has_kernels: bool) -> Optional[str]:
    if device != kind:
        return f"its kernels serve {kind} tensors only"
    if EXTENSION_ERROR is not None:
        return f"the extension did not load ({EXTENSION_ERROR})"
    if not has_kernels:
        return f"the extension was built without {kind.upper()} kernels"
    return None


# The flags are read per call (tests switch a backend off by patching them).
def _cpu_unavailable(device: str) -> Optional[str]:
    return _cpp_unavailable("cpu", device, HAS_CPU_KERNELS)


def _cuda_unavailable(device: str) -> Optional[str]:
    return _cpp_unavailable("cuda", device, HAS_CUDA_KERNELS)


def _cpp_operators() -> Dict[str, OperatorPair]:
    namespace = torch.ops.fused_poolformer
    return {"pool_mixer": (namespace.pool_mixer_forward.default, namespace.pool_mixer_backward.default),
            "block": (namespace.block_forward.default, namespace.block_backward.default)}


if EXTENSION_ERROR is None:
    contract.register_fake_kernels("fused_poolformer::pool_mixer_forward", "fused_poolformer::pool_mixer_backward")
    for prefix in ("", "triton_"):
        block_contract.register_fake_kernels(f"fused_poolformer::{prefix}block_forward",
                                             f"fused_poolformer::{prefix}block_backward")


# Triton: imported on first use (it registers its operators when imported).
_TRITON: dict = {}


def _import_triton():
    """The package ``fused_poolformer.triton``, or None where it cannot be imported."""
    if "module" not in _TRITON:
        try:
            from . import triton as triton_backend
        except ImportError as exc:
            _TRITON["module"], _TRITON["error"] = None, exc
        else:
            _TRITON["module"] = triton_backend
    return _TRITON["module"]


def triton_available() -> bool:
    return _import_triton() is not None


def triton_interpreted() -> bool:
    """Whether the Triton kernels were defined under TRITON_INTERPRET=1 (so they run on CPU
    tensors); triton.jit reads the variable when the kernels are imported, not per call."""
    module = _import_triton()
    return module is not None and module.INTERPRETED


def _triton_unavailable(device: str) -> Optional[str]:
    if device not in ("cpu", "cuda"):
        return "its kernels serve cuda tensors (and cpu ones under TRITON_INTERPRET=1) only"
    if not triton_available():
        return f"triton cannot be imported ({_TRITON.get('error')})"
    if device == "cpu" and not triton_interpreted():
        return "it serves CPU tensors only when TRITON_INTERPRET=1 was set before fused_poolformer.triton was imported"
    return None


def _triton_operators() -> Dict[str, OperatorPair]:
    module = _import_triton()
    families = {"pool_mixer": (module.forward_op, module.backward_op)}
    if EXTENSION_ERROR is None:  # the block composition over the Triton mixer lives in the extension
        namespace = torch.ops.fused_poolformer
        families["block"] = (namespace.triton_block_forward.default, namespace.triton_block_backward.default)
    return families


def _reference_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size, eps):
    """The unfused graph with the forward operators' signature (mean and rstd: None)."""
    from . import reference

    y = reference.pool_mixer(x, weight, bias, layer_scale=layer_scale, res_scale=res_scale,
                             sample_scale=sample_scale, num_groups=num_groups, pool_size=pool_size, eps=eps)
    return y, None, None


def _reference_backward(*args):
    raise NotImplementedError("the reference backend differentiates the unfused graph with autograd")


def _reference_block_forward(x, *arguments_and_flag):
    """The unfused block with the block forward operator's signature (out only)."""
    return block_contract.reference_forward(x, *arguments_and_flag[:-1]), None, None, None, None, None


register_backend(Backend(
    name="cpu", devices=("cpu",), summary="C++ kernels (csrc/cpu: at::vec, at::parallel_for)",
    unavailable_reason=_cpu_unavailable, load_operators=_cpp_operators,
    checks_in_python=False))
register_backend(Backend(
    name="cuda", devices=("cuda",), summary="CUDA C++ kernels (csrc/cuda)",
    unavailable_reason=_cuda_unavailable, load_operators=_cpp_operators,
    checks_in_python=False))
register_backend(Backend(
    name="triton", devices=("cuda", "cpu"), summary="Triton kernels (fused_poolformer/triton)",
    unavailable_reason=_triton_unavailable, load_operators=_triton_operators, checks_in_python=True,
    auto_devices=("cuda",), interpreted_devices=("cpu",)))
register_backend(Backend(
    name="reference", devices=("cpu", "cuda"), summary="the unfused PyTorch graph (fused_poolformer.reference)",
    unavailable_reason=lambda device: None,
    load_operators=lambda: {"pool_mixer": (_reference_forward, _reference_backward),
                            "block": (_reference_block_forward, _reference_backward)},
    checks_in_python=True, fused=False))
