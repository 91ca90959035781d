"""Benchmark of the mixture-of-LoRA layer and the knowledge projection (DESIGN.md sections 4-5).

Side by side, in one process, on the same inputs:
  fused      the Triton kernels (CUDA only)
  torch      our PyTorch shrink-gate-expand path (the CPU production path)
  reference  the reference implementation's algorithm: every expert on every
             token, outputs stacked into [E, T, out], top-k gathered, plus the
             shared expert and the base output (written here as the baseline)
  base       the frozen base linear alone (the floor)
for Qwen1.5 MLP shapes, forward (training forward, autograd recording) and
forward+backward (x, router and adapters trainable, base frozen): median time
and peak memory. Peak memory is the allocator's: on CUDA
torch.cuda.max_memory_allocated over the step; on the CPU the peak of the live
bytes in the torch profiler's allocation trace (profile_memory=True), both
counted from the step's start, so inputs and weights are excluded and
"extra" = peak(method) - peak(base) is what the adapters add.

    python launch/bench_kernels.py                  # CPU: the 7B gate_proj target row; GPU: full sweep
    python launch/bench_kernels.py --quick          # small shapes, seconds
    python launch/bench_kernels.py --models 7b --projs gate,down --tokens 2048,4096
    python launch/bench_kernels.py --compile-check  # compile every kernel config for sm_90 (no GPU needed)
Writes a table to stdout, JSON (--out, default runs/bench_kernels.json) and a PNG plot beside it.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.mixture_lora import mixture_lora_torch  # noqa: E402
from kernels.projection import orthonormal_basis, project_out_torch  # noqa: E402

# Qwen1.5 (DESIGN.md section 4): hidden, intermediate
MODELS = {"1.8b": (2048, 5504), "7b": (4096, 11008), "14b": (5120, 13696)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
E, TOP_K, RANK, SHARED_RANK, SCALING = 8, 2, 16, 32, 2.0      # the paper's stage-1 setting

TARGETS = {
    "cpu_torch_vs_reference_speedup_min": 2.0,
    "cpu_torch_vs_base_time_max": 1.2,
    "cpu_torch_extra_peak_vs_reference_max": 0.2,
    "gpu_fused_vs_base_time_max": 1.15,
    "gpu_projection_vs_copy_bandwidth_min": 0.70,
}


# ------------------------------------------------------------ the methods

def reference_algorithm(x, W, b, Wr, br, Ak, Bk, A, B, k, s):
    """All experts on all tokens, stacked [E, T, out], then the top-k gathered (the baseline)."""
    y = F.linear(x, W, b)
    xa = x.to(A.dtype)
    shared = F.linear(F.linear(xa, Ak), Bk) * s
    probs = F.linear(xa, Wr, br).softmax(-1)
    stacked = torch.stack([F.linear(F.linear(xa, A[e]), B[e]) * s for e in range(A.shape[0])], dim=0)
    stacked = stacked.transpose(0, 1)                                       # [T, E, out]
    w, sel = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    picked = stacked.gather(1, sel.unsqueeze(-1).expand(-1, -1, stacked.shape[-1]))   # [T, k, out]
    w = torch.cat([w, torch.ones_like(w[:, :1])], dim=-1)
    picked = torch.cat([picked, shared.unsqueeze(1)], dim=1)
    return y + torch.einsum("te,teo->to", w, picked).to(y.dtype)


def method_fn(name):
    if name == "base":
        return lambda x, W, b, *rest: F.linear(x, W, b)
    if name == "torch":
        return lambda *a: mixture_lora_torch(*a, TOP_K, SCALING)
    if name == "reference":
        return lambda *a: reference_algorithm(*a, TOP_K, SCALING)
    if name == "fused":
        from kernels.mixture_lora_triton import mixture_lora_triton
        return lambda *a: mixture_lora_triton(*a, TOP_K, SCALING)
    raise ValueError(name)


def make_layer(d_in, d_out, T, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rnd(T, d_in, scale=1.0).requires_grad_(True)
    W = rnd(d_out, d_in, scale=d_in ** -0.5)                  # frozen
    b = None                                                  # Qwen MLP projections have no bias
    trainable = [rnd(E, d_in, scale=d_in ** -0.5), rnd(E, scale=0.1),
                 rnd(SHARED_RANK, d_in, scale=d_in ** -0.5), rnd(d_out, SHARED_RANK, scale=0.02),
                 rnd(E, RANK, d_in, scale=d_in ** -0.5), rnd(E, d_out, RANK, scale=0.02)]
    for t in trainable:
        t.requires_grad_(True)
    gy = rnd(T, d_out, scale=1.0)
    return x, W, b, trainable, gy


# ------------------------------------------------------------ measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def run_step(fn, inputs, mode):
    x, W, b, trainable, gy = inputs
    y = fn(x, W, b, *trainable)
    if mode == "fwdbwd":
        y.backward(gy)
    return y


def cpu_peak_bytes(step):
    """Peak of live allocator bytes during step(), from the profiler's allocation trace."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(methods, inputs, mode, device, repeats, warmup):
    """Round-robin over the methods (so background load hits all alike); median times, one memory run each."""
    tensors = [inputs[0]] + inputs[3]
    fns = {m: method_fn(m) for m in methods}
    times = {m: [] for m in methods}
    grad_ctx = torch.enable_grad
    for rep in range(warmup + repeats):
        for m in methods:
            _clear_grads(tensors)
            _sync(device)
            t0 = time.perf_counter()
            with grad_ctx():
                out = run_step(fns[m], inputs, mode)
            _sync(device)
            dt = time.perf_counter() - t0
            del out
            if rep >= warmup:
                times[m].append(dt)
    peaks = {}
    for m in methods:
        _clear_grads(tensors)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = run_step(fns[m], inputs, mode)
            torch.cuda.synchronize()
            del out
            peaks[m] = torch.cuda.max_memory_allocated() - start
        else:
            peaks[m] = cpu_peak_bytes(lambda: run_step(fns[m], inputs, mode))
    _clear_grads(tensors)
    return {m: {"time_ms": 1e3 * statistics.median(times[m]), "times_ms": [1e3 * t for t in times[m]],
                "peak_mb": peaks[m] / 2 ** 20} for m in methods}


def bench_projection(device, dtype, shapes, repeats, use_fused):
    rows = []
    for M, d_in in shapes:
        g = torch.Generator().manual_seed(M)
        G = torch.randn(M, d_in, generator=g).to(dtype).to(device)
        A = (torch.randn(SHARED_RANK, d_in, generator=g) * d_in ** -0.5).to(dtype).to(device)
        basis = orthonormal_basis(A)
        nbytes = 2 * G.numel() * G.element_size()            # read once + write once
        dst = torch.empty_like(G).copy_(G)                   # preallocated: the device's copy bandwidth
        fns = {"copy": lambda: dst.copy_(G),
               "torch": lambda: project_out_torch(G, basis)}
        if use_fused:
            from kernels.projection_triton import knowledge_rows_basis, project_out_knowledge_triton, project_rows
            q = knowledge_rows_basis(A)
            fns["fused"] = lambda: project_rows(G, q)
            fns["fused+mgs"] = lambda: project_out_knowledge_triton(G, A)
        res = {}
        for name, fn in fns.items():
            ts = []
            for rep in range(repeats + 2):
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                if rep >= 2:
                    ts.append(time.perf_counter() - t0)
                out = None
            t = statistics.median(ts)
            res[name] = {"time_ms": 1e3 * t, "gbps": nbytes / t / 1e9}
        for name, r in res.items():
            rows.append({"M": M, "d_in": d_in, "r_k": SHARED_RANK, "dtype": str(dtype).replace("torch.", ""),
                         "method": name, **r, "vs_copy": r["gbps"] / res["copy"]["gbps"]})
    return rows


# ------------------------------------------------------------ compile check (no GPU needed)

def compile_check(capability=90, dtypes=("bf16", "fp32")):
    """Compile every autotune config of every kernel for sm_<capability>: registers, spills, shared memory.

    Mimics the JIT's specialisations (unit strides as constants, 16-divisible
    pointers and sizes), so the pipelining matches what a real launch gets.
    """
    import inspect
    import re
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import mixture_lora_triton as mt
    from kernels import projection_triton as pt
    if mt.INTERPRET:
        raise SystemExit("--compile-check needs TRITON_INTERPRET unset")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    unit = {"s_xk", "s_wk", "s_yn", "s_rw_k", "s_dyn", "s_dxk", "s_dsb_j", "s_deb_i", "s_dsa_k", "s_dea_k",
            "s_drw_k", "s_gd", "s_od"}
    div16 = {"IN", "OUT", "D", "T_BUCKET", "M_BUCKET"}
    rows = []

    def one(name, kernel, types, consts, configs=None):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel
        params = list(inspect.signature(fn.fn).parameters)
        for cfg in configs or kernel.configs:
            cx = dict(consts, **cfg.kwargs)
            cx.update({p: 1 for p in params if p in unit})
            sig = {p: ("constexpr" if p in cx else types.get(p, "i32")) for p in params}
            attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params
                     if sig[p] != "constexpr" and (sig[p].startswith("*") or p in div16 or p.startswith("s_"))}
            src = ASTSource(fn, sig, constexprs={k: v for k, v in cx.items() if k in params}, attrs=attrs)
            row = {"kernel": name, "dtype": dt, "config": cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages}
            try:
                c = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                   options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(c.asm["cubin"])
                    f.flush()
                    res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                m = re.search(r"REG:(\d+) STACK:(\d+)", res)
                row.update(regs=int(m.group(1)), spill_bytes=int(m.group(2)), smem=c.metadata.shared,
                           fits=c.metadata.shared <= 227 * 1024)
            except Exception as exc:  # noqa: BLE001 - report and go on
                row.update(error=str(exc).splitlines()[0][:200])
            rows.append(row)
            print(json.dumps(row))

    for dt in dtypes:
        p = "*" + dt
        f32 = "*fp32"
        tdt = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dt]
        prec = dict(PREC="tf32x3", UPCAST=False)
        one("shrink_route", mt._shrink_route_kernel,
            {"x_ptr": p, "a_ptr": p, "rw_ptr": p, "rb_ptr": p, "h_ptr": f32, "hg_ptr": f32, "probs_ptr": f32,
             "gates_ptr": f32, "idx_ptr": "*i32"}, dict(HAS_RB=True, TOPK=2, EP=16, ADT=tdt, RDT=tdt, **prec))
        one("base_expand", mt._base_expand_kernel,
            {"x_ptr": p, "w_ptr": p, "b_ptr": p, "hg_ptr": f32, "bt_ptr": p, "y_ptr": p, "scaling": "fp32"},
            dict(HAS_BIAS=False, XDT=tdt, LDT=tdt, **prec))
        one("grad_hg", mt._grad_hg_kernel, {"dy_ptr": p, "bt_ptr": p, "dhg_ptr": f32, "scaling": "fp32"},
            dict(LDT=tdt, **prec))
        one("gate_router_grad", mt._gate_router_grad_kernel,
            {"dhg_ptr": f32, "h_ptr": f32, "probs_ptr": f32, "gates_ptr": f32, "idx_ptr": "*i32", "dh_ptr": f32},
            dict(TOPK=2, EP=16))
        one("grad_x", mt._grad_x_kernel, {"dy_ptr": p, "w_ptr": p, "dh_ptr": f32, "a_ptr": p, "dx_ptr": p},
            dict(XDT=tdt, LDT=tdt, **prec))
        one("grad_b", mt._grad_b_kernel, {"dy_ptr": p, "hg_ptr": f32, "dsb_ptr": p, "deb_ptr": p,
                                          "scaling": "fp32"}, dict(LDT=tdt, **prec))
        one("grad_a", mt._grad_a_kernel, {"dh_ptr": f32, "x_ptr": p, "dsa_ptr": p, "dea_ptr": p, "drw_ptr": p},
            dict(LDT=tdt, **prec))
        one("mgs", pt._mgs_kernel, {"a_ptr": p, "q_ptr": "*fp64", "rtol": "fp32"}, dict(BD=2048),
            configs=[triton.Config({}, num_warps=8, num_stages=1)])
        one("project", pt._project_kernel, {"g_ptr": p, "q_ptr": "*fp64", "o_ptr": p},
            dict(CDT=tdt, RKP=32, **prec))
    return rows


# ------------------------------------------------------------ reporting

def machine_info(device):
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                            if ln.startswith("Model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        import triton
        info["triton"] = triton.__version__
    return info


def print_table(rows):
    hdr = f"{'shape':<22}{'T':>6} {'mode':<7}{'method':<10}{'time ms':>10}{'x base':>8}{'peak MB':>10}{'extra MB':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model'] + ' ' + r['proj'] + ' ' + str(r['d_in']) + 'x' + str(r['d_out']):<22}{r['tokens']:>6} "
              f"{r['mode']:<7}{r['method']:<10}{r['time_ms']:>10.1f}{r['vs_base_time']:>8.3f}"
              f"{r['peak_mb']:>10.1f}{r['extra_peak_mb']:>10.1f}")


def plot(rows, proj_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["model"], r["proj"], r["tokens"], r["mode"]) for r in rows},
                    key=lambda g: (g[3], list(MODELS).index(g[0]), g[1], g[2]))
    methods = [m for m in ("base", "fused", "torch", "reference") if any(r["method"] == m for r in rows)]
    ncols = 3 if proj_rows else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    width = 0.8 / max(len(methods), 1)
    labels = [f"{g[0]} {g[1]}\nT={g[2]} {g[3]}" for g in groups]
    for ax, key, title in ((axes[0], "time_ms", "time (ms, median)"),
                           (axes[1], "extra_peak_mb", "extra peak memory over base (MB)")):
        for i, m in enumerate(methods):
            vals = []
            for g in groups:
                r = next((r for r in rows if (r["model"], r["proj"], r["tokens"], r["mode"]) == g
                          and r["method"] == m), None)
                vals.append(r[key] if r else 0.0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=m)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    if proj_rows:
        ax = axes[2]
        names = sorted({r["method"] for r in proj_rows})
        shapes = sorted({(r["M"], r["d_in"]) for r in proj_rows})
        w2 = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [next((r["gbps"] for r in proj_rows if (r["M"], r["d_in"]) == s and r["method"] == n), 0.0)
                    for s in shapes]
            ax.bar([j + i * w2 for j in range(len(shapes))], vals, w2, label=n)
        ax.set_xticks([j + w2 * (len(names) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"G {s[0]}x{s[1]}" for s in shapes], fontsize=8)
        ax.set_title("projection: effective GB/s (read+write G)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_targets(rows, proj_rows, device):
    out = {}

    def find(method, **kw):
        return next((r for r in rows if r["method"] == method and all(r[k] == v for k, v in kw.items())), None)

    key = dict(model="7b", proj="gate", mode="fwdbwd")
    if device.type == "cpu":
        t = find("torch", tokens=4096, dtype="float32", **key)
        ref = find("reference", tokens=4096, dtype="float32", **key)
        base = find("base", tokens=4096, dtype="float32", **key)
        if t and ref and base:
            out["cpu_torch_vs_reference_speedup"] = ref["time_ms"] / t["time_ms"]
            out["cpu_torch_vs_base_time"] = t["time_ms"] / base["time_ms"]
            out["cpu_torch_extra_peak_vs_reference"] = t["extra_peak_mb"] / max(ref["extra_peak_mb"], 1e-9)
            out["cpu_pass"] = (out["cpu_torch_vs_reference_speedup"] >= TARGETS["cpu_torch_vs_reference_speedup_min"]
                               and out["cpu_torch_vs_base_time"] <= TARGETS["cpu_torch_vs_base_time_max"]
                               and out["cpu_torch_extra_peak_vs_reference"]
                               <= TARGETS["cpu_torch_extra_peak_vs_reference_max"])
    else:
        f = find("fused", tokens=8192, dtype="bfloat16", **key)
        base = find("base", tokens=8192, dtype="bfloat16", **key)
        if f and base:
            out["gpu_fused_vs_base_time"] = f["time_ms"] / base["time_ms"]
            out["gpu_fused_pass"] = out["gpu_fused_vs_base_time"] <= TARGETS["gpu_fused_vs_base_time_max"]
        fused_proj = [r for r in proj_rows if r["method"] == "fused"]
        if fused_proj:
            out["gpu_projection_vs_copy"] = min(r["vs_copy"] for r in fused_proj)
            out["gpu_projection_pass"] = out["gpu_projection_vs_copy"] >= TARGETS["gpu_projection_vs_copy_bandwidth_min"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", help="comma list of 1.8b,7b,14b")
    ap.add_argument("--projs", help="comma list of gate (= up: hidden -> intermediate), down")
    ap.add_argument("--tokens", help="comma list of token counts")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--dtype", help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--methods", help="comma list of base,fused,torch,reference")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument("--no-projection", action="store_true")
    ap.add_argument("--compile-check", action="store_true", help="compile all kernel configs for sm_90 and exit")
    ap.add_argument("--out", default="runs/bench_kernels.json")
    args = ap.parse_args(argv)

    if args.compile_check:
        rows = compile_check()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        path = os.path.splitext(args.out)[0] + "_compile.json"
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {path}")
        return 0

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    if args.quick:
        models, projs, tokens = ["1.8b"], ["gate"], [256]
        shapes = {"1.8b": (512, 1376)}
    else:
        models = (args.models or ("1.8b,7b,14b" if gpu else "7b")).split(",")
        projs = (args.projs or ("gate,down" if gpu else "gate")).split(",")
        tokens = [int(t) for t in (args.tokens or ("2048,4096,8192,16384" if gpu else "4096")).split(",")]
        shapes = MODELS
    methods = (args.methods or ("base,fused,torch,reference" if gpu else "base,torch,reference")).split(",")
    if not gpu and "fused" in methods:
        print("no CUDA device: the fused kernels are not timed (CPU runs them only under Triton's interpreter)")
        methods.remove("fused")
    repeats = args.repeats or (20 if gpu else 7 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2 if args.quick else 1)
    modes = args.modes.split(",")

    info = machine_info(device)
    print(json.dumps(info))
    rows = []
    for model in models:
        hidden, inter = shapes[model]
        for proj in projs:
            d_in, d_out = (hidden, inter) if proj in ("gate", "up") else (inter, hidden)
            for T in tokens:
                inputs = make_layer(d_in, d_out, T, dtype, device)
                for mode in modes:
                    res = measure(methods, inputs, mode, device, repeats, warmup)
                    base = res.get("base")
                    for m, r in res.items():
                        rows.append({"model": model, "proj": proj, "d_in": d_in, "d_out": d_out, "tokens": T,
                                     "mode": mode, "dtype": str(dtype).replace("torch.", ""), "method": m,
                                     "E": E, "top_k": TOP_K, "rank": RANK, "shared_rank": SHARED_RANK, **r,
                                     "vs_base_time": r["time_ms"] / base["time_ms"] if base else float("nan"),
                                     "extra_peak_mb": r["peak_mb"] - base["peak_mb"] if base else float("nan")})
                    print_table(rows[-len(res):])
                del inputs
                if gpu:
                    torch.cuda.empty_cache()

    proj_rows = []
    if not args.no_projection:
        pshapes = [(512, 1024)] if args.quick else ([(16384, 4096), (16384, 11008)] if gpu else [(4096, 4096)])
        proj_rows = bench_projection(device, dtype, pshapes, repeats, use_fused=gpu)
        print(f"\n{'projection G':<16}{'method':<11}{'time ms':>10}{'GB/s':>9}{'x copy':>8}")
        for r in proj_rows:
            print(f"{str(r['M']) + 'x' + str(r['d_in']):<16}{r['method']:<11}{r['time_ms']:>10.3f}"
                  f"{r['gbps']:>9.1f}{r['vs_copy']:>8.2f}")

    print("\nfull table")
    print_table(rows)
    targets = check_targets(rows, proj_rows, device)
    if targets:
        print("\ntargets:", json.dumps(targets, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "config": {"E": E, "top_k": TOP_K, "rank": RANK, "shared_rank": SHARED_RANK,
                                               "scaling": SCALING, "repeats": repeats, "warmup": warmup},
                   "targets": TARGETS, "target_results": targets, "layer": rows, "projection": proj_rows},
                  f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(rows, proj_rows, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
