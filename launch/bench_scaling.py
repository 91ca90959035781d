"""Cost as the work grows: tokens/s and peak memory against sequence length and model width, each point run
side by side with the peer, and the planner's step time and bytes communicated against the same points.

    python launch/bench_scaling.py           # CPU: max_length 512, 1024, 2048, 4096 at hidden 256, and hidden
                                             # 256, 512, 768 at 1024 (6 points), 2 layers, global batch 4
                                             # (micro 2, 2 ranks), 3 steps: 12-13 minutes on 2 cores
    python launch/bench_scaling.py --quick   # 2 small points, 2 steps: a smoke test (figures under runs/)
    python launch/bench_scaling.py --json    # the JSON report on stdout (the tables go to stderr)
    python launch/bench_scaling.py --ours-checkpointing   # ours (and the planner's steps) with recompute too

At every point, in turn, in one run (launch/bench_peer.py's functions, 2 ZeRO-3 ranks on the CPU under
`deepspeed --num_gpus 2`, the same base model, samples, global batch, micro-batch, maximum length and steps):

peer      transformers.Trainer + peft LoRA + DeepSpeed ZeRO-3 with LLaMA-Factory's defaults (see bench_peer.py).
stage 1   our stage 1 (attention LoRA + mixture of LoRA experts; its process also runs the TAIA merge).
stage 2   our stage 2, started from this point's stage-1 output (the like-for-like case for the peer).
planner   `launch/plan.py --measure --calibrate`: stage-1 optimizer steps on random tokens of exactly max_length
          (micro-batch x accumulation as above) under DeepSpeed's comms logger, on the same base; the last step's
          wall time and bytes all-gathered / reduce-scattered against plan()'s prediction, with plan() given this
          machine's rates measured in the same launch (a 2048^3 GEMM per rank -> gpu_tflops, an all-gather of
          32 MiB -> intra_node_gbs).

tokens/s counts real (non-padding) tokens inside each trainer's loop; peak memory is each rank's VmHWM (the
whole process). Samples are the demo's stage-2 rows joined into conversations of 40-90 % of max_length, read
again from the start where one pass gives fewer than global batch x steps. Writes runs/bench_scaling.json and
docs/scaling_seq.png, docs/scaling_width.png (--quick: runs/bench_scaling_quick.json, runs/scaling_*.png).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import REPO, build_inputs, launch, run_variant  # noqa: E402

# Stage 1 runs before stage 2 because stage 2 starts from its output (no separate one-step stage-1 launch).
ORDER = ("peer", "stage1", "stage2")
SWEEPS = {"seq": ("max_length", "sequence length (tokens)"), "width": ("hidden", "hidden size")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 points (hidden 128; 256 and 512 tokens), 2 steps")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seq-lengths", type=int, nargs="+", help="default 512 1024 2048 4096 (--quick 256 512)")
    p.add_argument("--widths", type=int, nargs="+", help="hidden sizes, multiples of 64; default 256 512 768 "
                                                         "(--quick 128)")
    p.add_argument("--fixed-width", type=int, help="hidden size of the length sweep (default 256, --quick 128)")
    p.add_argument("--fixed-length", type=int, help="max_length of the width sweep (default 1024, --quick 512)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000, help="model vocabulary (the lm_head's width)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--steps", type=int, help="optimizer steps per variant (default 3, --quick 2)")
    p.add_argument("--planner-steps", type=int, default=2, help="plan.py --measure steps; the last one is timed")
    p.add_argument("--ours-checkpointing", action="store_true",
                   help="our variants and the planner's steps with gradient checkpointing, as the peer runs "
                        "(default: off, as launch/recipes/demo.yaml; see bench_peer.py)")
    p.add_argument("--out", help="JSON report (default runs/bench_scaling.json, --quick runs/bench_scaling_quick.json)")
    p.add_argument("--plot-dir", help="where scaling_seq.png and scaling_width.png go (default docs, --quick runs)")
    return p.parse_args(argv)


def sweep_points(seq_lengths, widths, fixed_width: int, fixed_length: int) -> list:
    """The distinct (hidden, max_length) points in run order (the length sweep's, then the width sweep's), each
    naming the sweeps it belongs to: a point on both (fixed width at fixed length) runs once."""
    points = {}
    for length in seq_lengths:
        points.setdefault((fixed_width, length), []).append("seq")
    for hidden in widths:
        points.setdefault((hidden, fixed_length), []).append("width")
    for hidden, length in points:
        # bench_peer.build_inputs gives the model hidden // 64 heads: a head dimension of 64 needs a multiple
        if hidden <= 0 or hidden % 64:
            raise ValueError(f"hidden {hidden}: must be a positive multiple of 64")
        if length <= 0:
            raise ValueError(f"max_length {length}: must be > 0")
    return [{"hidden": h, "max_length": n, "sweeps": tags} for (h, n), tags in points.items()]


def point_settings(args, point: dict) -> dict:
    """bench_peer's settings dict for one point."""
    return {"layers": args.layers, "hidden": point["hidden"], "vocab": args.vocab, "max_length": point["max_length"],
            "micro": args.micro_batch, "global": args.global_batch, "steps": args.steps,
            "ours_checkpointing": args.ours_checkpointing}


def measure_planner(s: dict, inputs: dict, root: Path, steps: int) -> dict:
    """plan.py --measure --calibrate on this point's base: predicted vs measured step time and bytes."""
    out = root / "plan-measure.json"
    wall, peaks = launch(["launch/plan.py", "--measure", "--calibrate", "--recipe", "launch/recipes/demo.yaml",
                          "--model", inputs["model"], "--seq-len", str(s["max_length"]), "--micro-batch",
                          str(s["micro"]), "--global-batch", str(s["global"]), "--steps", str(steps),
                          "--checkpointing" if s["ours_checkpointing"] else "--no-checkpointing",
                          "--measure-out", str(out)], f"plan-{root.name}", root / "plan-measure.log")
    rep = json.loads(out.read_text())
    comm = {r["collective"]: {k: r[k] for k in ("predicted", "measured", "ratio")} for r in rep["communication"]}
    return {"calibration": rep["calibration"], "step_time": rep["step_time"], "communication": comm,
            "collective_calls": collective_calls(rep["comms_log"]),
            "gradient_accumulation": rep["gradient_accumulation"], "wall_seconds": wall}


def collective_calls(comms_log: dict) -> dict:
    """Calls per collective in the logged step (deepspeed.comm.log_summary's summary: op -> size -> record):
    many small calls make a step latency-bound, which a bytes / bandwidth model does not see."""
    calls = {}
    for name, sizes in comms_log.items():
        op = name.split("|")[0].strip()
        if op not in ("log_summary_barrier", "barrier"):
            calls[op] = calls.get(op, 0) + sum(int(rec["count"]) for rec in sizes.values())
    return calls


def run_point(args, point: dict, demo_dir: Path, work: Path) -> dict:
    s = point_settings(args, point)
    root = work / f"h{s['hidden']}-L{s['max_length']}"
    root.mkdir(parents=True)
    inputs = build_inputs(s, root, demo_dir=demo_dir, min_samples=s["global"] * s["steps"])
    runs = {}
    for variant in ORDER:
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        runs[variant] = run_variant(variant, s, inputs, root, 0,
                                    stage1_dir=root / "stage1-0" if variant == "stage2" else None)
        # the machine may be shared: the 1-minute load average around each launch is kept with its figures
        runs[variant]["load_average_1min"] = [load_before, os.getloadavg()[0]]
        print(f"  {variant}: {runs[variant]['tokens_per_s']:.0f} tokens/s, "
              f"{runs[variant]['peak_rss_max_bytes'] / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    planner = measure_planner(s, inputs, root, args.planner_steps)
    planner["load_average_1min"] = [load_before, os.getloadavg()[0]]
    print(f"  planner: step predicted {planner['step_time']['predicted_s']:.3f} s, measured "
          f"{planner['step_time']['measured_s']:.3f} s ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    peer = runs["peer"]
    ratios = {v: {"tokens_per_s": runs[v]["tokens_per_s"] / peer["tokens_per_s"],
                  "peak_rss": runs[v]["peak_rss_max_bytes"] / peer["peak_rss_max_bytes"]} for v in ("stage2", "stage1")}
    return {**point, "settings": s, "parameters": inputs["parameters"], "samples": inputs["samples_tokenized"],
            "runs": runs, "ratios_vs_peer": ratios, "planner": planner}


def machine_info() -> dict:
    import deepspeed
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                           platform.processor())
        info["cpus"] = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("CPU(s)")), None)
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    return info


# ----- the report ----------------------------------------------------------------------------------------------

def _gib(b):
    return b / 2**30


def tables(report: dict) -> str:
    """The two markdown tables: the variants side by side, and the planner against the measurement."""
    pts = report["points"]
    lines = ["| hidden | max_length | parameters | peer tokens/s | stage 2 tokens/s (x peer) | stage 1 tokens/s (x peer) "
             "| peer peak RSS, rank 0 / 1 | stage 2 peak (x peer) | stage 1 peak (x peer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        r, x = p["runs"], p["ratios_vs_peer"]
        peaks = lambda v: " / ".join(f"{_gib(b):.2f}" for b in r[v]["peak_rss_bytes"].values())  # noqa: E731
        lines.append(f"| {p['hidden']} | {p['max_length']} | {p['parameters'] / 1e6:.1f}M | "
                     f"{r['peer']['tokens_per_s']:.0f} | {r['stage2']['tokens_per_s']:.0f} "
                     f"({x['stage2']['tokens_per_s']:.2f}) | {r['stage1']['tokens_per_s']:.0f} "
                     f"({x['stage1']['tokens_per_s']:.2f}) | {peaks('peer')} GiB | {peaks('stage2')} GiB "
                     f"({x['stage2']['peak_rss']:.2f}) | {peaks('stage1')} GiB ({x['stage1']['peak_rss']:.2f}) |")
    lines += ["", "| hidden | max_length | calibrated TFLOP/s, GB/s | predicted step s (compute + comm) | "
              "measured step s | measured / predicted | all-gather MB predicted / measured | "
              "reduce-scatter MB predicted / measured |", "|---|---|---|---|---|---|---|---|"]
    for p in pts:
        c, t, m = p["planner"]["calibration"], p["planner"]["step_time"], p["planner"]["communication"]
        lines.append(f"| {p['hidden']} | {p['max_length']} | {c['gemm']['tflops']:.3f}, "
                     f"{c['all_gather']['bus_gbs']:.2f} | {t['predicted_s']:.3f} ({t['predicted_compute_s']:.3f} + "
                     f"{t['predicted_communication_s']:.3f}) | {t['measured_s']:.3f} | {t['ratio']:.2f} | "
                     f"{m['all_gather']['predicted'] / 1e6:.2f} / {m['all_gather']['measured'] / 1e6:.2f} | "
                     f"{m['reduce_scatter']['predicted'] / 1e6:.3f} / {m['reduce_scatter']['measured'] / 1e6:.3f} |")
    return "\n".join(lines)


def plot(report: dict, sweep: str, path: Path):
    """Four panels against the sweep's variable: tokens/s and peak RSS per variant; the planner's step time and
    bytes per step, predicted vs measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = SWEEPS[sweep]
    pts = sorted((p for p in report["points"] if sweep in p["sweeps"]), key=lambda p: p[key])
    xs = [p[key] for p in pts]
    fixed = (f"hidden {pts[0]['hidden']}" if sweep == "seq" else f"max_length {pts[0]['max_length']}") if pts else ""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {"peer": "#e45756", "stage2": "#4c78a8", "stage1": "#54a24b"}
    ax = axes[0][0]
    for v in ORDER:
        ax.plot(xs, [p["runs"][v]["tokens_per_s"] for p in pts], "o-", color=colors[v], label=v)
    ax.set_title("training tokens/s (2 ranks)")
    ax = axes[0][1]
    for v in ORDER:
        for rank_i, marker in (("0", "o-"), ("1", "s--")):
            ax.plot(xs, [_gib(p["runs"][v]["peak_rss_bytes"].get(rank_i, float("nan"))) for p in pts], marker,
                    color=colors[v], label=f"{v} rank {rank_i}", alpha=0.9 if rank_i == "0" else 0.6)
    ax.set_title("peak RSS per rank (GiB)")
    ax = axes[1][0]
    ax.plot(xs, [p["planner"]["step_time"]["predicted_s"] for p in pts], "o--", color="k", label="predicted")
    ax.plot(xs, [p["planner"]["step_time"]["predicted_compute_s"] for p in pts], ":", color="grey",
            label="predicted compute part")
    ax.plot(xs, [p["planner"]["step_time"]["measured_s"] for p in pts], "o-", color=colors["stage1"],
            label="measured (plan.py --measure)")
    ax.set_yscale("log")
    ax.set_title("stage-1 optimizer step (s): planner vs measured")
    ax = axes[1][1]
    for coll, color in (("all_gather", "#4c78a8"), ("reduce_scatter", "#f58518")):
        ax.plot(xs, [p["planner"]["communication"][coll]["predicted"] / 1e6 for p in pts], "o--", color=color,
                label=f"{coll} predicted")
        ax.plot(xs, [p["planner"]["communication"][coll]["measured"] / 1e6 for p in pts], "x", color=color,
                markersize=10, label=f"{coll} measured (comms logger)")
    ax.set_yscale("log")
    ax.set_title("MB communicated per optimizer step")
    for row in axes:
        for ax in row:
            ax.set_xlabel(label)
            if sweep == "seq":
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Cost as the work grows ({label}, {fixed}; {report['settings']['layers']} layers, vocab "
                 f"{report['settings']['vocab']}, global batch {report['settings']['global']}, "
                 f"{report['settings']['steps']} steps; {report['started']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    q = args.quick
    args.seq_lengths = args.seq_lengths or ([256, 512] if q else [512, 1024, 2048, 4096])
    args.widths = args.widths or ([128] if q else [256, 512, 768])
    args.fixed_width = args.fixed_width or (128 if q else 256)
    args.fixed_length = args.fixed_length or (512 if q else 1024)
    args.steps = args.steps or (2 if q else 3)
    out = Path(args.out or REPO / "runs" / ("bench_scaling_quick.json" if q else "bench_scaling.json"))
    plot_dir = Path(args.plot_dir or REPO / ("runs" if q else "docs"))
    points = sweep_points(args.seq_lengths, args.widths, args.fixed_width, args.fixed_length)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_scaling-"))
    demo_dir = work / "demo"
    results = []
    for i, point in enumerate(points):
        print(f"point {i + 1}/{len(points)}: hidden {point['hidden']}, max_length {point['max_length']} "
              f"({'+'.join(point['sweeps'])}; {time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)
        results.append(run_point(args, point, demo_dir, work))
    report = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "total_seconds": time.perf_counter() - t0,
              "settings": {"layers": args.layers, "vocab": args.vocab, "micro": args.micro_batch,
                           "ours_checkpointing": args.ours_checkpointing,
                           "global": args.global_batch, "steps": args.steps, "planner_steps": args.planner_steps,
                           "seq_lengths": args.seq_lengths, "widths": args.widths, "fixed_width": args.fixed_width,
                           "fixed_length": args.fixed_length},
              "machine": machine_info(), "points": results, "work_dir": str(work)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for sweep in SWEEPS:
        plot(report, sweep, plot_dir / f"scaling_{sweep}.png")
    text = (f"started {report['started']}, {report['total_seconds'] / 60:.1f} min; {args.layers} layers, vocab "
            f"{args.vocab}, global batch {args.global_batch} (micro {args.micro_batch}, 2 ranks), {args.steps} steps\n"
            + tables(report) + f"\nJSON: {out}; plots: {plot_dir}/scaling_seq.png, {plot_dir}/scaling_width.png")
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
