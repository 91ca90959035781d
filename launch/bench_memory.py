"""A rank's host memory, measured phase by phase on 2 CPU ranks, against the planner's prediction.

    python launch/bench_memory.py                 # the demo and a 0.5B Qwen2-shaped model, about 6 minutes
    python launch/bench_memory.py --case 0.5b     # one of them
    python launch/bench_memory.py --json          # the JSON report on stdout (the tables go to stderr)

Each case runs the whole pipeline (stage 1, TAIA merge, stage 2, final merge; evaluation off) under
`deepspeed --num_gpus 2` on the CPU, fp32, a few optimizer steps per stage. The pipeline measures every
rank's resident set per phase (medcare_dist.training.host_memory: <output_dir>/host_memory.json) and
accounts its training tensors by role (stageN/result.json). The planner (medcare_dist.cluster.host_plan)
predicts the same phases from the model's config, the recipe's adapters and batch, and DeepSpeed's
ZeRO knobs; the table gives measured / predicted for each.

  demo   the embedded tiny model (4.4 MB of weights): the runtime is nearly all of it
  0.5b   Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936, tied
         embedding; 494M parameters, 1.98 GB in fp32) with seeded random weights, built locally once

The figures go to docs/benchmarks_train.md.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 2 ** 30
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
# The measured phases with a planner counterpart: (phase in host_memory.json, planner phase).
PHASES = [("stage1/load", "load"), ("stage1/train", "train"), ("merge", "merge"), ("stage2/load", "load"),
          ("stage2/train", "train"), ("final", "merge")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["demo", "0.5b", "both"], default="both")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per stage (default 4)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_memory"), help="work directory (kept: the 0.5B "
                                                                               "model is built once)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_memory.json"))
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def build_05b(root: Path) -> tuple[Path, dict]:
    """The 0.5B-shaped base (seeded random weights, the demo tokenizer) and the demo data files."""
    from medcare_dist.demo.assets import prepare_demo

    assets = prepare_demo(root / "demo")
    model_dir = root / "qwen2-0.5b-shaped"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = assets.tokenizer()
        torch.manual_seed(0)
        tmp = root / ".qwen2-0.5b-shaped.tmp"
        Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(model_dir)
    return model_dir, assets.files


def case_overrides(case: str, root: Path, steps: int) -> list[str]:
    common = [f"output_dir={root / case / 'run'}", f"stage1.max_steps={steps}", f"stage2.max_steps={steps}",
              "stage1.save_every=0", "stage2.save_every=0", "evaluation.report_models=[]",
              "evaluation.general_retention=false", "logging.progress_bar=false", "logging.report_to=[]",
              "resume=false"]
    if case == "demo":
        return common
    model_dir, files = build_05b(root)
    return common + [f"model.path={model_dir}", "data.demo=false", f"data.stage1=[{files['stage1_train']}]",
                     f"data.stage2=[{files['stage2_train']}]", "data.stage2_replay=0", "data.max_length=256",
                     "stage1.micro_batch_size=4", "stage2.micro_batch_size=4", "stage1.global_batch_size=8",
                     "stage2.global_batch_size=8",
                     # At this size prefetch pays on a CPU too, and without it glibc's arenas held more (stage 2
                     # peaked at 5.5 GiB per rank with demo.yaml's zero3_cpu.json, 5.1 GiB with zero3.json).
                     "deepspeed.config=ds_configs/zero3.json"]


def run_case(case: str, root: Path, steps: int) -> tuple[list[str], float]:
    import shutil

    overrides = case_overrides(case, root, steps)
    shutil.rmtree(root / case / "run", ignore_errors=True)
    log = root / case / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launch/train.py",
                               "--recipe", "launch/recipes/demo.yaml", *overrides], env=env, cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: the {case} run exited {proc.returncode}; see {log}")
    return overrides, time.perf_counter() - t0


def predict(case: str, root: Path, overrides: list[str]) -> dict:
    """The planner's host memory per phase for this case's two stages, from the run's own recipe and data."""
    from medcare_dist.cluster.host_plan import host_memory
    from medcare_dist.cluster.model_shape import load_model_shape
    from medcare_dist.cluster.planner import Cluster, Workload, plan, zero_settings
    from medcare_dist.config import load_config
    from medcare_dist.training.ds_config import build_ds_config

    cfg = load_config("launch/recipes/demo.yaml", overrides)
    out = Path(cfg.output_dir)
    model_dir = Path(cfg.model.path) if cfg.model.path else out / "demo_assets" / "base_model"
    shape = load_model_shape(str(model_dir))
    result = {}
    for stage in (1, 2):
        stage_cfg = cfg.stage1 if stage == 1 else cfg.stage2
        data = json.loads((out / f"stage{stage}" / "result.json").read_text())["summary"]["data"]
        # Packed micro-batches: tokens, not samples x max_length, set the activations (the mean sample here).
        tokens = math.ceil(stage_cfg.micro_batch_size * data["num_tokens"] / max(1, data["num_rows"]))
        work = Workload(stage=stage, seq_len=tokens, micro_batch=1, global_batch=stage_cfg.global_batch_size,
                        dtype="fp32", gradient_checkpointing=cfg.model.gradient_checkpointing, device="cpu",
                        loss_chunk_tokens=cfg.model.loss_chunk_tokens)
        zero = zero_settings(build_ds_config(cfg, stage_cfg, 2, "fp32"))
        p = plan(shape, Cluster(nodes=1, gpus_per_node=2), work, zero, cfg.adapters)
        result[stage] = {"tokens_per_micro_batch": tokens, "plan_memory": p["memory"]["per_gpu_bytes"],
                         "host": host_memory(p, "cpu")}
    return result


def compare(case: str, root: Path, predicted: dict) -> dict:
    """Each rank's measured phase peaks beside the prediction. The planner takes a rank's runtime as an input:
    here each rank's own, measured (its resident set when it starts loading its first model)."""
    from medcare_dist.cluster.host_plan import CPU_RUNTIME_BYTES

    out = root / case / "run"
    ranks = json.loads((out / "host_memory.json").read_text())["ranks"]
    rows = []
    for phase, kind in PHASES:
        stage = 2 if phase.startswith("stage2") or phase == "final" else 1
        host = predicted[stage]["host"]["phases"][kind]
        for rank, r in enumerate(ranks):
            if phase not in r["phases"]:
                continue
            runtime = r["phases"]["stage1/load"]["start"]
            want = host["rank0" if rank == 0 else "other"] - CPU_RUNTIME_BYTES + runtime
            got = r["phases"][phase]["peak"]
            idle = kind == "merge" and rank != 0
            rows.append({"phase": phase, "rank": rank, "idle": idle, "runtime": runtime, "measured": got,
                         "predicted": want, "error": want / got - 1})
    tensors = [json.loads((out / f"stage{s}" / "result.json").read_text())["summary"]["host_memory"]
               for s in (1, 2)]
    best = max(rows, key=lambda r: r["measured"])
    return {"rows": rows, "runtime_measured": [r["phases"]["stage1/load"]["start"] for r in ranks],
            "tensors": tensors, "peak": best}


def table(case: str, cmp: dict, predicted: dict, seconds: float) -> list[str]:
    lines = [f"{case}: {seconds:.0f} s; runtime (resident set before the first model) "
             + ", ".join(f"rank {i} {b / GiB:.2f}" for i, b in enumerate(cmp["runtime_measured"]))
             + " GiB; tokens per micro-batch " + ", ".join(f"stage {s} {predicted[s]['tokens_per_micro_batch']}"
                                                         for s in (1, 2)),
             "| phase | rank | measured peak | predicted | predicted vs measured |", "|---|---|---|---|---|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['phase']} | {r['rank']}{' (idle)' if r['idle'] else ''} | {r['measured'] / GiB:.2f} GiB | "
                     f"{r['predicted'] / GiB:.2f} GiB | {100 * r['error']:+.0f} % |")
    b = cmp["peak"]
    lines.append(f"| the run's peak ({b['phase']}, rank {b['rank']}) | | {b['measured'] / GiB:.2f} GiB | "
                 f"{b['predicted'] / GiB:.2f} GiB | {100 * b['error']:+.0f} % |")
    for s in (1, 2):
        lines.append(f"stage {s} training tensors of rank 0 (MiB): " + ", ".join(
            f"{k} {v / 2 ** 20:.1f}" for k, v in cmp["tensors"][s - 1][0]["tensors"].items()))
        lines.append(f"stage {s} planner's training rows (MiB): " + ", ".join(
            f"{k} {v / 2 ** 20:.1f}" for k, v in predicted[s]["host"]["components"]["train (every rank)"].items()))
    return lines


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.work)
    cases = ["demo", "0.5b"] if args.case == "both" else [args.case]
    report, lines = {}, []
    for case in cases:
        print(f"running {case}", file=sys.stderr, flush=True)
        overrides, seconds = run_case(case, root, args.steps)
        predicted = predict(case, root, overrides)
        cmp = compare(case, root, predicted)
        within = all(abs(r["error"]) <= 0.2 for r in cmp["rows"] if not r["idle"])
        report[case] = {"seconds": seconds, "comparison": cmp, "predicted": predicted,
                        "peaks within 20 %": within}
        lines += table(case, cmp, predicted, seconds) + [f"every phase's peak within 20 % of the prediction "
                                                         f"(the ranks idle during a merge aside): {within}", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
