"""Model level: timm PoolFormer models, original against converted (``convert_model``),
each also under torch.compile.

Variants (``MODEL_IMPLS``): ``original`` (the timm model), ``mixer`` (the token-mixer
branch of every block fused, ``convert_model(fuse="mixer")``), ``block`` (every block fused
whole where the block operator serves it, ``convert_model(fuse="block")``), and each under
torch.compile (``+compile``).  A form the installed ``convert_model`` cannot build (no
``fuse=`` argument, no block fused whole, the conversion failed) gets a row whose
``status`` says "unavailable" and why; a variant that raises gets a row with status
"error"; the others are timed as usual.

Per model: parameters and MACs (fvcore, as the paper's table, else
torch.utils.flop_counter), and for the models whose latency is asked for, per layout
(NCHW, channels_last): inference latency, training-step time (AdamW), its peak memory and
the bytes of the activations it saves for the backward (every storage the saved-tensor
hooks see during the training forward, parameters included), and the token-mixer branches
alone -- every converted block's norm1 -> pool - x -> layer scale -> residual, on the input
that block receives in the model (the part the mixer conversion changes).  Every row has
its time and saved-bytes ratios against the original eager and the original + compile.

One timing method: the variants are timed in groups -- the eager forms together, then the
compiled ones -- every variant with its own copy of the weights; each warms up (bounded; a
compiled variant compiles in its first calls, timed as ``first_calls_s``), then the
group's variants alternate call by call over the repetitions and medians are reported, so
drift in machine load hits them alike and their ratio is stable from run to run.
"""

import contextlib
import copy
import inspect
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
FORMS = ("original", "mixer", "block")
MODEL_IMPLS = ("original", "mixer", "block", "original+compile", "mixer+compile", "block+compile")
# Variants timed together (alternating call by call): the eager forms, then the compiled ones.
MODEL_GROUPS = (("original", "mixer", "block"), ("original+compile", "mixer+compile", "block+compile"))
# Every row's ratios are against these two (same layout): suffix of the field -> variant.
BASELINES = (("original", "original"), ("original_compile", "original+compile"))
WARMUP_CALLS = 2  # the first call of a compiled variant compiles it; the second runs it once
# Largest |converted - original| / max |original| of the logits that counts as the same model.
OUTPUT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TIMING_FIELDS = ("infer_ms", "infer_min_ms", "infer_max_ms", "images_per_s", "train_step_ms", "train_min_ms",
                 "train_max_ms", "peak_mem_mb", "peak_mem_method", "saved_bytes", "saved_storages",
                 "max_rel_output_diff", "output_matches", "first_calls_s", "mixer_fwd_ms", "mixer_fwd_bwd_ms")


def form_of(impl: str) -> str:
    """"block+compile" -> "block"."""
    return impl.split("+")[0]


def converter() -> Tuple[Optional[Callable], Optional[str]]:
    """fused_poolformer.convert_model, or the reason it cannot be used."""
    try:
        from ..convert import convert_model
    except ImportError as exc:
        return None, f"converted rows skipped: fused_poolformer.convert is unavailable ({exc})"
    return convert_model, None


def form_converters(convert_model: Optional[Callable], why_not: Optional[str] = None) -> Dict[str, tuple]:
    """form -> (model -> converted model, None) or (None, why it is unavailable).  The
    block form needs a ``convert_model`` that takes ``fuse=``; without it, the mixer form
    is the plain conversion (the token mixer was its only level)."""
    if convert_model is None:
        reason = why_not or "fused_poolformer.convert_model is unavailable"
        return {"mixer": (None, reason), "block": (None, reason)}
    try:
        takes_fuse = "fuse" in inspect.signature(convert_model).parameters
    except (TypeError, ValueError):
        takes_fuse = False
    if not takes_fuse:
        return {"mixer": (lambda m: convert_model(m, inplace=False), None),
                "block": (None, "the installed fused_poolformer.convert_model takes no fuse= argument "
                                "(block-level fusion is not installed)")}
    return {"mixer": (lambda m: convert_model(m, inplace=False, fuse="mixer"), None),
            "block": (lambda m: convert_model(m, inplace=False, fuse="block"), None)}


def _conversion_problem(form: str, model) -> Optional[str]:
    """Why a converted model does not stand for its form (nothing converted, no block fused
    whole), or None."""
    report = getattr(model, "fused_poolformer_report", None)
    if report is None or not report.converted:
        return f"convert_model converted no block ({report})"
    if form == "block":
        levels = getattr(report, "levels", {}) or {}
        if not any(level == "block" for level in levels.values()):
            reasons = [reason for _, reason in getattr(report, "mixer_only", [])][:1]
            return "no block was fused whole" + (f" ({reasons[0]})" if reasons else "")
    return None


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


def saved_activation_bytes(model, images, labels, amp) -> Tuple[int, int]:
    """(bytes, count) of the distinct storages that the saved-tensor hooks see during one
    training forward and loss of ``model`` -- what autograd keeps for the backward,
    parameters (and autocast's casts of them) included; a storage saved twice counts once.
    Under torch.compile the hooks see what the compiled graph saves."""
    storages: Dict[Tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with amp():
            loss = F.cross_entropy(model(images), labels)
    del loss  # frees the graph and what it saved
    return sum(storages.values()), len(storages)


def _median_ms(seconds: List[float]) -> dict:
    summary = timing.summarize(seconds)
    return {k: summary[k] for k in ("median_ms", "min_ms", "max_ms")}


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


class ModelBench:
    """Times a group of variants of one model on one layout (see the module docstring).
    A variant whose first calls raise is dropped from the group (``failed``: impl -> the
    error) and the others are timed."""

    def __init__(self, cfg, variants: Dict[str, torch.nn.Module], converted_blocks: List[str], layout: str):
        self.cfg, self.variants, self.converted_blocks = cfg, dict(variants), converted_blocks
        self.dtype = DTYPES[cfg.model_dtype]
        self.amp = _autocast(cfg.device, self.dtype)
        gen = torch.Generator(device=cfg.device).manual_seed(0)
        size = cfg.model_image_size
        self.images = torch.randn(cfg.model_batch, 3, size, size, generator=gen, device=cfg.device).contiguous(
            memory_format=LAYOUTS[layout])
        self.labels = torch.randint(0, 1000, (cfg.model_batch,), generator=gen, device=cfg.device)
        self.first_call_s = {impl: 0.0 for impl in variants}
        self.failed: Dict[str, str] = {}
        self.warmed = False

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
        its compilation, which fills the compile caches); returns their seconds.  A
        variant that raises is dropped (``failed``)."""
        for impl, model in list(self.variants.items()):
            start = time.perf_counter()
            try:
                model.eval()
                inference_step(model, self.images, self.amp)()
                model.train()
                training_step(model, self.images, self.labels, self.amp)()
                timing.synchronize(self.cfg.device)
            except Exception as exc:  # the row says so; the group goes on without it
                self.failed[impl] = _error_text(exc)
                del self.variants[impl]
                self.cfg.notes.append(f"model variant {impl} failed on its first calls: {self.failed[impl]}")
                continue
            self.first_call_s[impl] += time.perf_counter() - start
        self.warmed = True
        return {impl: s for impl, s in self.first_call_s.items() if impl in self.variants}

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

    def saved_bytes(self) -> Dict[str, Tuple[Optional[int], Optional[int]]]:
        """(bytes, storages) saved by each variant's training forward (None where the hooks
        could not be used)."""
        self._mode(True)
        out = {}
        for impl, model in self.variants.items():
            try:
                out[impl] = saved_activation_bytes(model, self.images, self.labels, self.amp)
            except Exception as exc:
                self.cfg.notes.append(f"saved-activation bytes of {impl} not measured: {_error_text(exc)}")
                out[impl] = (None, None)
        return out

    def mixer_branches(self) -> Dict[str, Dict[str, dict]]:
        """Interleaved times of the token-mixer branches, original against the mixer-fused
        form (the branch it changes)."""
        original, converted = self.variants.get("original"), self.variants.get("mixer")
        if original is None or converted is None or not self.converted_blocks:
            return {}
        self._mode(False)
        inputs = _block_inputs(original, self.converted_blocks, self.images, self.amp)
        branches = {
            "original": [(lambda t, b=original.get_submodule(n): unfused_mixer_branch(b, t), x)
                         for n, x in zip(self.converted_blocks, inputs)],
            "mixer": [(converted.get_submodule(n).token_mixer_branch, x)
                      for n, x in zip(self.converted_blocks, inputs)],
        }
        reps = 3 * self.cfg.model_reps  # short steps: more repetitions for steadier medians
        return {mode: self._interleaved({k: mixer_branches_step(v, train, self.amp) for k, v in branches.items()},
                                        reps, record=False)
                for mode, train in (("forward", False), ("forward_backward", True))}

    def run(self) -> Dict[str, dict]:
        """Every variant's timings (see the module docstring); warms first if ``warm`` was
        not called."""
        cfg = self.cfg
        if not self.warmed:
            self.warm()
        if not self.variants:
            return {}
        differences = self.output_differences()
        infer = self._interleaved(self._inference_steps(), cfg.model_reps, record=False)
        self._mode(True)
        train_steps = self._training_steps()
        self._warm_up(train_steps, record=False)  # the optimizer state exists before memory is measured
        memory = PeakMemory(cfg.device)
        peaks = {impl: memory.measure(step) for impl, step in train_steps.items()}
        saved = self.saved_bytes()
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
                saved_bytes=saved[impl][0], saved_storages=saved[impl][1],
                max_rel_output_diff=differences[impl],
                output_matches=differences[impl] <= OUTPUT_TOLERANCE[self.dtype],
                first_calls_s=self.first_call_s[impl],
                mixer_fwd_ms=branches.get("forward", {}).get(impl, {}).get("median_ms"),
                mixer_fwd_bwd_ms=branches.get("forward_backward", {}).get(impl, {}).get("median_ms"))
        return results


class ModelForms:
    """One timm model, its converted forms (on the CPU), and its variant groups; a form
    that cannot be built is in ``unavailable`` with the reason."""

    def __init__(self, name: str, cfg, convert_model: Optional[Callable], why_not: Optional[str] = None):
        import timm

        torch.manual_seed(0)
        self.name, self.cfg = name, cfg
        self.original = timm.create_model(name, pretrained=False).eval()
        self.models: Dict[str, torch.nn.Module] = {"original": self.original}
        self.unavailable: Dict[str, str] = {}
        wanted = {form_of(i) for i in cfg.model_impls} - {"original"}
        for form, (convert, reason) in form_converters(convert_model, why_not).items():
            if form not in wanted:
                continue
            if convert is None:
                self.unavailable[form] = reason
                continue
            try:
                model = convert(self.original)
            except Exception as exc:  # a conversion that raises is a row that says so
                self.unavailable[form] = f"convert_model raised {_error_text(exc)}"
                continue
            problem = _conversion_problem(form, model)
            if problem:
                self.unavailable[form] = problem
            else:
                self.models[form] = model.eval()
        mixer = self.models.get("mixer")
        self.blocks = list(mixer.fused_poolformer_report.converted) if mixer is not None else []
        self.blocks_converted = {form: len(m.fused_poolformer_report.converted) for form, m in self.models.items()
                                 if form != "original"}
        self.impls = [i for i in cfg.model_impls if not i.endswith("+compile") or name in cfg.compile_models]

    def available(self, impl: str) -> bool:
        return form_of(impl) in self.models

    def groups(self) -> List[List[str]]:
        """The variants timed together (alternating), eager first: compiling takes long
        and a time budget should cut the compiled groups, not the eager ones."""
        groups = [[i for i in group if i in self.impls and self.available(i)] for group in MODEL_GROUPS]
        return [g for g in groups if g]

    def variants(self, impls: List[str], layout: str) -> Dict[str, torch.nn.Module]:
        """impl -> its own copy of the weights on the device in ``layout`` (training changes
        them), compiled where the name says so."""
        variants = {}
        for impl in impls:
            model = copy.deepcopy(self.models[form_of(impl)]).to(self.cfg.device, memory_format=LAYOUTS[layout])
            if impl.endswith("+compile"):
                model = torch.compile(model, backend=self.cfg.compile_backend)
            variants[impl] = model
        return variants

    def macs(self) -> Dict[str, Tuple[Optional[int], str]]:
        """(MACs, counter) at 1x3x224x224 per form (compiling does not change the math);
        (None, why) where counting failed."""
        example = torch.randn(1, 3, 224, 224)
        out = {}
        for form, model in self.models.items():
            try:
                out[form] = flops.count_macs(model.eval(), example)
            except Exception as exc:
                out[form] = (None, f"not counted: {_error_text(exc)}")
        return out


def _speedups(rows: List[dict], layout: str) -> None:
    """Every timed row's ratios against the original eager and the original + compile of
    the same layout: time speed-ups (baseline / row) and saved bytes (row / baseline)."""
    by_impl = {r["impl"]: r for r in rows if r["layout"] == layout and r.get("train_step_ms")}
    for row in by_impl.values():
        for suffix, base in BASELINES:
            ref = by_impl.get(base)
            for key in ("infer", "train_step"):
                row[f"{key}_speedup_vs_{suffix}"] = ref[f"{key}_ms"] / row[f"{key}_ms"] if ref else None
            row[f"saved_vs_{suffix}"] = (row["saved_bytes"] / ref["saved_bytes"]
                                         if ref and ref.get("saved_bytes") and row.get("saved_bytes") is not None
                                         else None)


RATIO_FIELDS = tuple(f"{key}_vs_{suffix}" for suffix, _ in BASELINES
                     for key in ("infer_speedup", "train_step_speedup", "saved"))


class ModelRun:
    """One model: its forms, MACs, the row fields its variants share, and its timed groups."""

    def __init__(self, name: str, cfg, convert_model: Optional[Callable], why_not: Optional[str] = None):
        self.name, self.cfg = name, cfg
        self.forms = ModelForms(name, cfg, convert_model, why_not)
        self.macs = self.forms.macs()
        self.common = dict(model=name, params_m=sum(p.numel() for p in self.forms.original.parameters()) / 1e6,
                           paper_macs_g=PAPER_MACS_G[name], paper_params_m=PAPER_PARAMS_M[name],
                           dtype=cfg.model_dtype, batch=None, image_size=None,
                           **{k: None for k in TIMING_FIELDS + RATIO_FIELDS})
        self.rows: List[dict] = []

    @property
    def timed(self) -> bool:
        return self.name in self.cfg.latency_models

    def row(self, impl: str, layout: Optional[str], fields: dict) -> dict:
        form = form_of(impl)
        count, counter = self.macs.get(form, (None, "-"))
        macs_g = None if count is None else count / 1e9
        row = dict(self.common, impl=impl, form=form, layout=layout,
                   blocks_converted=self.forms.blocks_converted.get(form, 0), macs_g=macs_g, macs_counter=counter,
                   macs_vs_paper_pct=None if macs_g is None else 100.0 * (macs_g / PAPER_MACS_G[self.name] - 1.0),
                   status="ok", error=None)
        row.update(fields)
        return row

    def unavailable_rows(self, emit: Callable) -> None:
        """One row per asked-for variant whose form is unavailable (per layout when timed)."""
        layouts = self.cfg.model_layouts if self.timed else [None]
        for impl in self.forms.impls:
            reason = self.forms.unavailable.get(form_of(impl))
            if reason is None:
                continue
            for layout in layouts:
                self.rows.append(self.row(impl, layout, dict(status="unavailable", error=reason)))
                emit("models", self.rows[-1])

    def emit_macs_rows(self, emit: Callable) -> None:
        """Parameters and MACs only (a model whose latency is not asked for)."""
        for impl in self.forms.impls:
            if self.forms.available(impl):
                self.rows.append(self.row(impl, None, {}))
                emit("models", self.rows[-1])
        self.unavailable_rows(emit)

    def plans(self) -> List[Tuple[List[str], str]]:
        """(group, layout) in timing order: every layout of the eager group, then the
        compiled group (a time budget should cut compiled variants, not eager ones)."""
        return [(group, layout) for group in self.forms.groups() for layout in self.cfg.model_layouts]

    def bench(self, group: List[str], layout: str) -> "ModelBench":
        return ModelBench(self.cfg, self.forms.variants(group, layout), self.forms.blocks, layout)

    def time(self, group: List[str], layout: str, bench: "ModelBench", emit: Callable) -> None:
        """Times the group; a variant that failed, or a group whose timing raised, is a row
        with status "error"."""
        cfg = self.cfg
        cfg.say(f"{self.name} {layout}: {', '.join(group)}")
        try:
            timings = bench.run()
            errors = dict(bench.failed)
        except Exception as exc:  # the rows say so; the run goes on
            timings, errors = {}, {impl: _error_text(exc) for impl in group}
            cfg.notes.append(f"model rows {self.name} {layout} {', '.join(group)}: {errors[group[0]]}")
        sized = dict(batch=cfg.model_batch, image_size=cfg.model_image_size)
        group_rows = [self.row(impl, layout, dict(timings[impl], **sized)) if impl in timings
                      else self.row(impl, layout, dict(sized, status="error", error=errors.get(impl, "not timed")))
                      for impl in group]
        self.rows += group_rows
        _speedups(self.rows, layout)
        for row in group_rows:
            emit("models", row)


def bench_model(name: str, cfg, convert_model: Optional[Callable], emit: Callable,
                why_not: Optional[str] = None) -> List[dict]:
    """Every row of one model, each group and layout built, warmed and timed in turn."""
    run = ModelRun(name, cfg, convert_model, why_not)
    if not run.timed:
        run.emit_macs_rows(emit)
        return run.rows
    for group, layout in run.plans():
        if cfg.out_of_time():
            cfg.notes.append(f"model rows {name} {layout} {', '.join(group)} skipped: --time-budget reached")
            continue
        run.time(group, layout, run.bench(group, layout), emit)
    run.unavailable_rows(emit)
    return run.rows


def bench_models_warm_first(runs: List[ModelRun], cfg, emit: Callable) -> None:
    """Every timed variant built and warmed (a compiled one compiles here), then
    ``cfg.signal_ready``; the timing waits for ``cfg.wait_for_go``: a process started early
    compiles while others use the device, and times when the device is its own.  Should
    the go come while it is still warming, the groups warmed so far are timed at once (the
    eager ones come first) and the warming goes on after them."""
    pending: List[tuple] = []

    def time_pending() -> None:
        while pending:
            run, group, layout, bench = pending.pop(0)
            if cfg.out_of_time():
                cfg.notes.append(f"model rows {run.name} {layout} {', '.join(group)} skipped: --time-budget reached")
                continue
            run.time(group, layout, bench, emit)

    warmed = {}
    for run in runs:
        for group, layout in run.plans() if run.timed else []:
            if cfg.go_given():
                cfg.start_budget()
                time_pending()
            cfg.say(f"warming {run.name} {layout}: {', '.join(group)}")
            bench = run.bench(group, layout)
            for impl, s in bench.warm().items():
                warmed[f"{run.name} {layout} {impl}"] = s
                print(f"warmed {run.name} {layout} {impl}: {s:.1f} s", flush=True)
            for impl, error in bench.failed.items():
                print(f"FAILED {run.name} {layout} {impl}: {error}", flush=True)
            pending.append((run, group, layout, bench))
    cfg.signal_ready(warmed)
    cfg.wait_for_go()
    time_pending()
    for run in runs:
        if run.timed:
            run.unavailable_rows(emit)


def run_models(cfg, emit: Callable) -> List[dict]:
    convert_model, reason = converter()
    if convert_model is None:
        cfg.notes.append(reason)
    if not getattr(cfg, "go_file", None):
        return [row for name in cfg.models for row in bench_model(name, cfg, convert_model, emit, reason)]
    runs = [ModelRun(name, cfg, convert_model, reason) for name in cfg.models]
    for run in runs:
        if not run.timed:
            run.emit_macs_rows(emit)
    bench_models_warm_first(runs, cfg, emit)
    return [row for run in runs for row in run.rows]


def warm_compile_models(cfg) -> Dict[str, float]:
    """Compiles every compiled variant of the timed models once (inference and training
    step), so that the compile caches are warm for a later timing run; returns seconds
    per (model, layout, impl)."""
    convert_model, reason = converter()
    seconds = {}
    for name in cfg.latency_models:
        forms = ModelForms(name, cfg, convert_model, reason)
        compiled = [i for i in forms.impls if i.endswith("+compile") and forms.available(i)]
        for layout in cfg.model_layouts if compiled else []:
            cfg.say(f"warming {name} {layout}: {', '.join(compiled)}")
            bench = ModelBench(cfg, forms.variants(compiled, layout), [], layout)
            for impl, s in bench.warm().items():
                seconds[f"{name} {layout} {impl}"] = s
                print(f"compiled {name} {layout} {impl}: {s:.1f} s", flush=True)
            for impl, error in bench.failed.items():
                print(f"warming {name} {layout} {impl} failed: {error}", flush=True)
    return seconds
