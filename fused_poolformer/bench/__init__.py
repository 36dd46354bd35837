"""Benchmarks of the fused pool mixer: host overhead, op level (three timings per row
against the byte floor), model level, the GPU notes.  Run ``python -m fused_poolformer.bench
--help`` (or ``fused-poolformer-bench``).

Modules: ``cli`` (arguments, the run), ``op_level``, ``host_overhead``, ``model_level``,
``timing`` (eager loop, CUDA-graph replay, profiler), ``costs`` (bytes, FLOPs, floor,
predicted times), ``inputs`` (random inputs, the float64 reference check), ``report``
(tables, JSON, plot), ``notes`` (benchmarks/results/GPU_NOTES.md).
"""

from .cli import build_parser, main, make_config, run
from .inputs import ReferenceMismatch

__all__ = ["ReferenceMismatch", "build_parser", "main", "make_config", "run"]
