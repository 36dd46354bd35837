"""The Triton backend: ``torch.library.triton_op`` operators with the C++ operators'
contract (``fused_poolformer.contract``).  Importing this package registers them
(``torch.ops.fused_poolformer.triton_pool_mixer_forward`` / ``_backward``) with their
autograd formula.  Under ``TRITON_INTERPRET=1`` (set before this import) the kernels run
on CPU tensors through Triton's interpreter."""

from .operators import _INTERPRET as INTERPRETED
from .operators import backward_op, forward_op

__all__ = ["INTERPRETED", "backward_op", "forward_op"]
