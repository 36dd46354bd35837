"""Model level: timm PoolFormer models, original against converted (``convert_model``),
each also under torch.compile.

Per model: parameters and MACs (fvcore, as the paper's table, else
torch.utils.flop_counter), and for the models whose latency is asked for, per layout
(NCHW, channels_last): inference latency, training-step time (AdamW) and its peak memory,
and the token-mixer branches alone -- every converted block's norm1 -> pool - x -> layer
scale -> residual, on the input that block receives in the model (the part the conversion
changes).

One timing method: the variants are timed in groups -- original with converted, then
original + torch.compile with converted + torch.compile -- every variant with its own copy
of the weights; each warms up (bounded; a compiled variant compiles in its first calls,
timed as ``first_calls_s``), then the group's variants alternate call by call over the
repetitions and medians are reported, so drift in machine load hits them alike and their
ratio is stable from run to run.
"""

import contextlib
import copy
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import flops
from . import timing
from .inputs import DTYPES, LAYOUTS

MODELS = ("poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48")
PAPER_MACS_G = {"poolformer_s12": 1.8, "poolformer_s24": 3.4, "poolformer_s36": 5.0,
                "poolformer_m36": 8.8, "poolformer_m48": 11.6}
PAPER_PARAMS_M = {"poolformer_s12": 12, "poolformer_s24": 21, "poolformer_s36": 31,
                  "poolformer_m36": 56, "poolformer_m48": 73}
MODEL_IMPLS = ("original", "converted", "original+compile", "converted+compile")
# Variants timed together (alternating call by call); speed-ups are over each group's first.
MODEL_GROUPS = (("original", "converted"), ("original+compile", "converted+compile"))
WARMUP_CALLS = 2  # the first call of a compiled variant compiles it; the second runs it once
# Largest |converted - original| / max |original| of the logits that counts as the same model.
OUTPUT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def converter() -> Tuple[Optional[Callable], Optional[str]]:
    """fused_poolformer.convert_model, or the reason it cannot be used."""
    try:
        from ..convert import convert_model
    except ImportError as exc:
        return None, f"converted rows skipped: fused_poolformer.convert is unavailable ({exc})"
    return convert_model, None


class PeakMemory:
    """Peak memory of a block above what was held when it began: the CUDA caching
    allocator's peak, or on the CPU the process's resident-set high-water mark (VmHWM,
    reset through /proc/self/clear_refs) minus the RSS before the block."""

    def __init__(self, device: str):
        self.device = device
        self.method = ("torch.cuda.max_memory_allocated - allocated before" if device == "cuda"
                       else "RSS high-water mark (VmHWM) - RSS before, after malloc_trim")

    @staticmethod
    def _status_kb(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    @staticmethod
    def _release_free_heap() -> None:
        """Returns freed heap pages to the OS (glibc), so that the RSS before a step
        counts live memory only and the step's own peak shows in the high-water mark."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def measure(self, fn: Callable) -> Optional[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        self._release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            return None
        before = self._status_kb("VmRSS")
        fn()
        peak = self._status_kb("VmHWM")
        return None if before is None or peak is None else (peak - before) / 1024


def _autocast(device: str, dtype: torch.dtype):
    """The autocast context of a model step: none for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device, dtype=dtype)


def inference_step(model, images, amp) -> Callable:
    def step():
        with torch.inference_mode(), amp():
            model(images)
    return step


def training_step(model, images, labels, amp) -> Callable:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with amp():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return step


def unfused_mixer_branch(block, x):
    """The first residual branch of a timm MetaFormerBlock, as the original computes it."""
    return block.res_scale1(x) + block.layer_scale1(block.drop_path1(block.token_mixer(block.norm1(x))))


def _block_inputs(model, names: List[str], images, amp) -> List[torch.Tensor]:
    """The input each named block receives in a forward of ``images``."""
    inputs = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
             for n in names]
    try:
        with torch.no_grad(), amp():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def mixer_branches_step(branches: List[Tuple[Callable, torch.Tensor]], train: bool, amp) -> Callable:
    """Every token-mixer branch on its own recorded input; with ``train`` also its backward
    (a fixed random cotangent per branch, parameter gradients accumulated)."""
    inputs = [x.clone().requires_grad_(train) for _, x in branches]
    cotangents = [torch.randn_like(x) for x in inputs]

    def step():
        if not train:
            with torch.inference_mode(), amp():
                for (fn, _), x in zip(branches, inputs):
                    fn(x)
            return
        for (fn, _), x, g in zip(branches, inputs, cotangents):
            with amp():
                y = fn(x)
            y.backward(g.to(y.dtype))
    return step


def _median_ms(seconds: List[float]) -> dict:
    summary = timing.summarize(seconds)
    return {k: summary[k] for k in ("median_ms", "min_ms", "max_ms")}


class ModelBench:
    """Times a group of variants of one model on one layout (see the module docstring)."""

    def __init__(self, cfg, variants: Dict[str, torch.nn.Module], converted_blocks: List[str], layout: str):
        self.cfg, self.variants, self.converted_blocks = cfg, variants, converted_blocks
        self.dtype = DTYPES[cfg.model_dtype]
        self.amp = _autocast(cfg.device, self.dtype)
        gen = torch.Generator(device=cfg.device).manual_seed(0)
        size = cfg.model_image_size
        self.images = torch.randn(cfg.model_batch, 3, size, size, generator=gen, device=cfg.device).contiguous(
            memory_format=LAYOUTS[layout])
        self.labels = torch.randint(0, 1000, (cfg.model_batch,), generator=gen, device=cfg.device)
        self.first_call_s = {impl: 0.0 for impl in variants}

    def _mode(self, train: bool) -> None:
        for model in self.variants.values():
            model.train(train)

    def _warm_up(self, steps: Dict[str, Callable], calls: int = WARMUP_CALLS, record: bool = True) -> None:
        """``calls`` calls of each step; the first is timed into ``first_call_s`` when
        ``record`` (it compiles a compiled variant)."""
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            timing.synchronize(self.cfg.device)
            if record:
                self.first_call_s[impl] += time.perf_counter() - start
            for _ in range(calls - 1):
                step()

    def _interleaved(self, steps: Dict[str, Callable], reps: int, record: bool = True) -> Dict[str, dict]:
        self._warm_up(steps, record=record)
        times = timing.interleaved_times(steps, reps, self.cfg.device)
        return {impl: _median_ms(t) for impl, t in times.items()}

    def _inference_steps(self) -> Dict[str, Callable]:
        return {k: inference_step(m, self.images, self.amp) for k, m in self.variants.items()}

    def _training_steps(self) -> Dict[str, Callable]:
        return {k: training_step(m, self.images, self.labels, self.amp) for k, m in self.variants.items()}

    def warm(self) -> Dict[str, float]:
        """One inference and one training call of each variant (for a compiled variant:
        its compilation, which fills the compile caches); returns their seconds."""
        self._mode(False)
        self._warm_up(self._inference_steps(), calls=1)
        self._mode(True)
        self._warm_up(self._training_steps(), calls=1)
        return dict(self.first_call_s)

    def output_differences(self) -> Dict[str, float]:
        """max |variant - baseline| / max |baseline| of the logits, the baseline being the
        group's first variant."""
        self._mode(False)
        outputs = {}
        for impl, model in self.variants.items():
            with torch.inference_mode(), self.amp():
                outputs[impl] = model(self.images).float()
        ref = next(iter(outputs.values()))
        scale = ref.abs().max().item()
        return {impl: (y - ref).abs().max().item() / scale for impl, y in outputs.items()}

    def mixer_branches(self) -> Dict[str, Dict[str, dict]]:
        """Interleaved times of the token-mixer branches, original against converted."""
        original, converted = self.variants.get("original"), self.variants.get("converted")
        if original is None or converted is None or not self.converted_blocks:
            return {}
        self._mode(False)
        inputs = _block_inputs(original, self.converted_blocks, self.images, self.amp)
        branches = {
            "original": [(lambda t, b=original.get_submodule(n): unfused_mixer_branch(b, t), x)
                         for n, x in zip(self.converted_blocks, inputs)],
            "converted": [(converted.get_submodule(n).token_mixer_branch, x)
                          for n, x in zip(self.converted_blocks, inputs)],
        }
        reps = 3 * self.cfg.model_reps  # short steps: more repetitions for steadier medians
        return {mode: self._interleaved({k: mixer_branches_step(v, train, self.amp) for k, v in branches.items()},
                                        reps, record=False)
                for mode, train in (("forward", False), ("forward_backward", True))}

    def run(self) -> Dict[str, dict]:
        cfg = self.cfg
        differences = self.output_differences()
        infer = self._interleaved(self._inference_steps(), cfg.model_reps)
        self._mode(True)
        train_steps = self._training_steps()
        self._warm_up(train_steps)  # the optimizer state exists before memory is measured
        memory = PeakMemory(cfg.device)
        peaks = {impl: memory.measure(step) for impl, step in train_steps.items()}
        train = {impl: _median_ms(t) for impl, t in
                 timing.interleaved_times(train_steps, cfg.model_reps, cfg.device).items()}
        branches = self.mixer_branches()
        self._mode(False)
        results = {}
        for impl in self.variants:
            results[impl] = dict(
                infer_ms=infer[impl]["median_ms"], infer_min_ms=infer[impl]["min_ms"],
                infer_max_ms=infer[impl]["max_ms"],
                images_per_s=cfg.model_batch / (infer[impl]["median_ms"] * 1e-3),
                train_step_ms=train[impl]["median_ms"], train_min_ms=train[impl]["min_ms"],
                train_max_ms=train[impl]["max_ms"], peak_mem_mb=peaks[impl], peak_mem_method=memory.method,
                max_rel_output_diff=differences[impl],
                output_matches=differences[impl] <= OUTPUT_TOLERANCE[self.dtype],
                first_calls_s=self.first_call_s[impl],
                mixer_fwd_ms=branches.get("forward", {}).get(impl, {}).get("median_ms"),
                mixer_fwd_bwd_ms=branches.get("forward_backward", {}).get(impl, {}).get("median_ms"))
        return results


class ModelForms:
    """One timm model, original and converted (on the CPU), and its variant groups."""

    def __init__(self, name: str, cfg, convert_model: Optional[Callable]):
        import timm

        torch.manual_seed(0)
        self.name, self.cfg = name, cfg
        self.original = timm.create_model(name, pretrained=False).eval()
        self.converted = convert_model(self.original, inplace=False) if convert_model is not None else None
        self.blocks = list(self.converted.fused_poolformer_report.converted) if self.converted is not None else []
        self.impls = [i for i in cfg.model_impls if (self.converted is not None or not i.startswith("converted"))
                      and (not i.endswith("+compile") or name in cfg.compile_models)]

    def groups(self) -> List[List[str]]:
        """The variants timed together (alternating), eager first: compiling takes long
        and a time budget should cut the compiled groups, not the eager ones."""
        groups = [[i for i in group if i in self.impls] for group in MODEL_GROUPS]
        return [g for g in groups if g]

    def variants(self, impls: List[str], layout: str) -> Dict[str, torch.nn.Module]:
        """impl -> its own copy of the weights on the device in ``layout`` (training changes
        them), compiled where the name says so."""
        variants = {}
        for impl in impls:
            source = self.converted if impl.startswith("converted") else self.original
            model = copy.deepcopy(source).to(self.cfg.device, memory_format=LAYOUTS[layout])
            if impl.endswith("+compile"):
                model = torch.compile(model, backend=self.cfg.compile_backend)
            variants[impl] = model
        return variants

    def macs(self) -> Dict[str, Tuple[int, str]]:
        """(MACs, counter) at 1x3x224x224 per form (compiling does not change the math)."""
        example = torch.randn(1, 3, 224, 224)
        forms = {"original": self.original, "converted": self.converted}
        return {k: flops.count_macs(m.eval(), example) for k, m in forms.items() if m is not None}


def _speedups(rows: List[dict], layout: str, group: List[str]) -> None:
    """Speed-ups over the group's first variant (converted over original, converted +
    compile over original + compile) and over the eager original, same layout."""
    by_impl = {r["impl"]: r for r in rows if r["layout"] == layout and r.get("train_step_ms")}
    for impl in group:
        row = by_impl.get(impl)
        if row is None:
            continue
        for suffix, base in (("", group[0]), ("_vs_original", "original")):
            ref = by_impl.get(base)
            for key in ("infer", "train_step"):
                row[f"{key}_speedup{suffix}"] = ref[f"{key}_ms"] / row[f"{key}_ms"] if ref else None


def bench_model(name: str, cfg, convert_model: Optional[Callable], emit: Callable) -> List[dict]:
    forms = ModelForms(name, cfg, convert_model)
    macs = forms.macs()
    common = dict(model=name, params_m=sum(p.numel() for p in forms.original.parameters()) / 1e6,
                  paper_macs_g=PAPER_MACS_G[name], paper_params_m=PAPER_PARAMS_M[name],
                  blocks_converted=len(forms.blocks), dtype=cfg.model_dtype, batch=None, image_size=None,
                  infer_ms=None, images_per_s=None, train_step_ms=None, peak_mem_mb=None)

    def row_of(impl: str, layout: Optional[str], timings: dict) -> dict:
        count, counter = macs[impl.split("+")[0]]
        return dict(common, impl=impl, layout=layout, macs_g=count / 1e9, macs_counter=counter,
                    macs_vs_paper_pct=100.0 * (count / 1e9 / PAPER_MACS_G[name] - 1.0), **timings)

    rows = []
    if name not in cfg.latency_models:
        for impl in forms.impls:
            rows.append(row_of(impl, None, {}))
            emit("models", rows[-1])
        return rows
    for group in forms.groups():
        for layout in cfg.model_layouts:
            if cfg.out_of_time():
                cfg.notes.append(f"model rows {name} {layout} {', '.join(group)} skipped: --time-budget reached")
                continue
            cfg.say(f"{name} {layout}: {', '.join(group)}")
            timings = ModelBench(cfg, forms.variants(group, layout), forms.blocks, layout).run()
            group_rows = [row_of(impl, layout, dict(timings[impl], batch=cfg.model_batch,
                                                   image_size=cfg.model_image_size)) for impl in group]
            rows += group_rows
            _speedups(rows, layout, group)
            for row in group_rows:
                emit("models", row)
    return rows


def run_models(cfg, emit: Callable) -> List[dict]:
    convert_model, reason = converter()
    if convert_model is None:
        cfg.notes.append(reason)
    rows = []
    for name in cfg.models:
        rows += bench_model(name, cfg, convert_model, emit)
    return rows


def warm_compile_models(cfg) -> Dict[str, float]:
    """Compiles every compiled variant of the timed models once (inference and training
    step), so that the compile caches are warm for a later timing run; returns seconds
    per (model, layout, impl)."""
    convert_model, _ = converter()
    seconds = {}
    for name in cfg.latency_models:
        forms = ModelForms(name, cfg, convert_model)
        compiled = [i for i in forms.impls if i.endswith("+compile")]
        for layout in cfg.model_layouts if compiled else []:
            cfg.say(f"warming {name} {layout}: {', '.join(compiled)}")
            for impl, s in ModelBench(cfg, forms.variants(compiled, layout), [], layout).warm().items():
                seconds[f"{name} {layout} {impl}"] = s
    return seconds
