"""Issue 19 goal table: poolformer_s12, batch 8, fp32, CPU, one process, medians, ratios within one run."""
import statistics, sys, time, json
import torch, timm
import fused_poolformer as fp
from torch.profiler import profile

torch.manual_seed(0)
layout = sys.argv[1]
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
compile_too = "--compile" in sys.argv
x = torch.randn(8, 3, 224, 224)
base = timm.create_model("poolformer_s12")
if layout == "cl":
    base = base.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
models = {"original": base, "mixer": fp.convert_model(base, fuse="mixer"), "block": fp.convert_model(base)}
if compile_too:
    models["original+compile"] = torch.compile(base)
    models["block+compile"] = torch.compile(models["block"])

def train(m):
    m.train(); m(x).sum().backward()
def infer(m):
    m.eval()
    with torch.no_grad(): m(x)

res = {}
for kind, fn in (("train", train), ("infer", infer)):
    for name, m in models.items():
        t = time.perf_counter(); fn(m); fn(m)
        print(f"warm {name} {kind} {time.perf_counter()-t:.1f}s", file=sys.stderr)
    for r in range(reps):
        for name, m in models.items():
            t = time.perf_counter(); fn(m); res.setdefault((name, kind), []).append(time.perf_counter() - t)
out = {}
for kind in ("train", "infer"):
    o = statistics.median(res[("original", kind)])
    oc = statistics.median(res[("original+compile", kind)]) if compile_too else None
    for name in models:
        med = statistics.median(res[(name, kind)])
        line = f"{layout} {kind:5s} {name:17s} {med*1e3:8.0f} ms  vs original {o/med:5.2f}x"
        if oc: line += f"  vs original+compile {oc/med:5.2f}x"
        print(line)
        out[f"{kind}/{name}"] = med
GEMM_KEYS = {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::mkldnn_convolution_backward",
             "mkldnn::_convolution_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::_convolution",
             "aten::convolution", "aten::conv2d", "aten::linear", "aten::matmul"}
def split(m):
    train(m)
    with profile() as prof:
        train(m)
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    gemm = sum(e.self_cpu_time_total for e in ka if e.key in GEMM_KEYS)
    return total / 1e3, gemm / 1e3
for name in ("original", "mixer", "block"):
    total, gemm = split(models[name])
    print(f"{layout} profile {name:8s} total {total:7.0f} ms  GEMM {gemm:7.0f}  outside GEMMs {total-gemm:6.0f}")
    out[f"profile/{name}"] = (total, gemm)
def saved(m):
    seen = {}
    def pack(t):
        st = t.untyped_storage(); seen[st.data_ptr()] = st.nbytes(); return t
    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    return sum(seen.values())
so = saved(models["original"])
for name, m in (("mixer", models["mixer"]), ("block", models["block"]), ("block recompute=mlp", fp.convert_model(base, recompute="mlp"))):
    print(f"{layout} saved {name:20s} {saved(m)/2**20:7.1f} MiB = {saved(m)/so:.3f}x original ({so/2**20:.1f} MiB)")
json.dump(out, open(f"/tmp/meas/goals-{layout}.json", "w"))
