"""Our training against the stack a LLaMA-Factory user runs instead, side by side in one run, 2 ZeRO-3 ranks.

    python launch/bench_peer.py              # CPU: 4 layers, hidden 512, vocab 32k (44M parameters), 1024 tokens,
                                             # 12 steps each, about 10 minutes
    python launch/bench_peer.py --quick      # CPU: 2 layers, hidden 256, 512 tokens, 4 steps each, 2-3 minutes
    python launch/bench_peer.py --json       # the JSON report on stdout (the table goes to stderr)
    python launch/bench_peer.py --ours-checkpointing   # ours with gradient checkpointing too, like the peer

peer      transformers.Trainer + peft LoRA + DeepSpeed ZeRO-3 the way LLaMA-Factory runs them by default: the
          model loaded with from_pretrained under the Trainer's DeepSpeed config (zero.Init), LoRA r 8, alpha 16,
          dropout 0 on every linear layer but lm_head (`lora_target: all`), gradient checkpointing on
          (reentrant), micro-batches padded to their longest sample (a multiple of 8), HF's AdamW and cosine
          schedule, LLaMA-Factory's ds_z3_config.json ("auto" values resolved by the Trainer). Nothing of it
          is changed but one line: accelerate finds no backend on a CPU and would not start DeepSpeed, so the
          worker tells it "gloo" (what the DeepSpeed CPU accelerator's ranks use here too).
stage 2   our stage 2 (`launch/train.py stage=2 init_from=...`): the Knowledge Aggregator plus the orthogonal
          alignment LoRA on the MLP projections of a frozen base; the like-for-like case.
stage 1   our stage 1 (`stage=1`): attention LoRA plus the mixture of LoRA experts on every MLP projection,
          which does more adapter work than plain LoRA; its process also runs the TAIA merge.

All three train the same base (random weights, saved once), on the same samples (the demo's stage-2 rows
joined into multi-turn conversations of 40-90 % of max_length, tokenized once by our data path; the peer gets
the identical token ids and labels, loss on every assistant turn), with the same global
batch, micro-batch, maximum length and number of optimizer steps, under `deepspeed --num_gpus 2` on the CPU.
tokens/s counts real (non-padding) tokens over the optimizer steps (the Trainer's loop for the peer, our
trainer's for ours; neither saves checkpoints inside it). Peak memory is each rank process's resident-set
high-water mark (VmHWM, the whole process: load, training, and for stage 1 the merge), polled from /proc.
The time split: wall time of the launch vs time inside the training loop. --rounds N repeats the three
runs N times in turn (peer, stage 2, stage 1, peer, ...) and reports medians, so a change in the
machine's load hits all three alike. The figures go to docs/benchmarks_train.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# LLaMA-Factory's examples/deepspeed/ds_z3_config.json (the values it ships; "auto" resolved by the Trainer).
PEER_DS_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}
VARIANTS = ("peer", "stage2", "stage1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_peer.json"))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000, help="model vocabulary (the lm_head's width)")
    p.add_argument("--max-length", type=int, default=None, help="CPU default 1024 (--quick 512)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ours-checkpointing", action="store_true",
                   help="our variants with gradient checkpointing on, as our model recipes have it and the peer "
                        "runs (default: off, as launch/recipes/demo.yaml)")
    p.add_argument("--worker", choices=["peer"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----- the peer, inside each rank ------------------------------------------------------------------------------

def peer_worker(spec: dict):
    import deepspeed
    import torch

    deepspeed.init_distributed()
    import accelerate.state as accelerate_state

    probe = accelerate_state.PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):  # the one change: see the docstring
        found, kind = probe(self, cpu, sagemaker_dp, backend)
        return found or "gloo", kind

    accelerate_state.PartialState._prepare_backend = prepare_backend

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    world = torch.distributed.get_world_size()
    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["global"] // (spec["micro"] * world), max_steps=spec["steps"],
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.1, deepspeed=PEER_DS_CONFIG,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        ddp_backend="gloo", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)  # zero.Init: args exist
    model.enable_input_require_grads()  # what LLaMA-Factory does for checkpointing with a frozen embedding
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in open(spec["rows"])]
    counted = {"tokens": 0}

    def collate(batch):  # DataCollatorForSeq2Seq(pad_to_multiple_of=8): pad to the longest, labels with -100
        n = -(-max(len(r["input_ids"]) for r in batch) // 8) * 8
        counted["tokens"] += sum(len(r["input_ids"]) for r in batch)
        pad = lambda seq, v: seq + [v] * (n - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in batch]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch])}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            counted["tokens"], self.t0 = 0, time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[clock])
    result = trainer.train()
    tokens = torch.tensor(float(counted["tokens"]))
    torch.distributed.all_reduce(tokens)
    if torch.distributed.get_rank() == 0:
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in model.parameters() if p.requires_grad)
        Path(spec["result"]).write_text(json.dumps({
            "seconds": clock.seconds, "tokens": tokens.item(), "tokens_per_s": tokens.item() / clock.seconds,
            "train_loss": result.metrics.get("train_loss"), "trainable_parameters": trainable}))
    # Leave the process group before exiting: one peer rank of a 2-round run (2026-12-01) was killed at exit by
    # "terminate called without an active exception" (a communication thread still joinable at teardown).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----- the driver ----------------------------------------------------------------------------------------------

def settings(args) -> dict:
    quick = args.quick
    return {"layers": args.layers or (2 if quick else 4), "hidden": args.hidden or (256 if quick else 512),
            "vocab": args.vocab, "max_length": args.max_length or (512 if quick else 1024), "micro": args.micro_batch,
            "global": args.global_batch, "steps": args.steps or (4 if quick else 12),
            "ours_checkpointing": getattr(args, "ours_checkpointing", False)}


def build_inputs(s: dict, root: Path, demo_dir: Path = None, min_samples: int = 0) -> dict:
    """The base model (random, saved once), the samples file and its token rows, shared by every variant.
    demo_dir: where the demo's data and tokenizer are built (once; default root/demo); min_samples: see
    multi_turn_samples."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medcare_dist.data.conversations import load_stage_dataset
    from medcare_dist.demo.assets import prepare_demo

    assets = prepare_demo(demo_dir or root / "demo")
    tok = assets.tokenizer()
    heads = max(1, s["hidden"] // 64)
    config = Qwen2Config(hidden_size=s["hidden"], intermediate_size=int(s["hidden"] * 2.75) // 8 * 8,
                         num_hidden_layers=s["layers"], num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), vocab_size=s["vocab"], max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = root / "base"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    samples = multi_turn_samples(assets.files["stage2_train"], tok, s["max_length"], root / "samples.jsonl",
                                 min_samples)
    dataset, _ = load_stage_dataset([{"path": str(samples)}], tok, s["max_length"])
    rows = root / "rows.jsonl"
    with open(rows, "w") as f:
        for r in dataset:
            f.write(json.dumps({"input_ids": list(r["input_ids"]), "labels": list(r["labels"])}) + "\n")
    params = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    return {"model": str(model_dir), "samples": str(samples), "rows": str(rows), "parameters": params,
            "samples_tokenized": len(dataset)}


def multi_turn_samples(source: Path, tok, max_length: int, out: Path, min_samples: int = 0) -> Path:
    """The demo's one-turn rows joined, in file order, into multi-turn conversations of 40-90 % of max_length
    tokens (a seeded target per conversation): SFT-like lengths, so padding and the loss weigh what they do.
    If one pass over the rows gives fewer than min_samples conversations (long max_length), the rows are read
    again from the start, in the same order, and the file ends at the min_samples-th conversation; otherwise
    it is that of one pass (so the default lengths' files are what they always were)."""
    import itertools
    import random

    rng = random.Random(0)
    rows = [json.loads(line)["messages"] for line in open(source)]
    lengths = [len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
               for m in rows]
    written = 0
    with open(out, "w") as f:
        turns, length, target = [], 0, rng.uniform(0.4, 0.9) * max_length
        for reread in itertools.count():
            for messages, n in zip(rows, lengths):
                if turns and length + n > target:
                    f.write(json.dumps({"messages": turns}) + "\n")
                    written += 1
                    if reread and written >= min_samples:
                        return out
                    turns, length, target = [], 0, rng.uniform(0.4, 0.9) * max_length
                turns, length = turns + messages, length + n
            if written + bool(turns) >= min_samples or not rows:
                break
        if turns:
            f.write(json.dumps({"messages": turns}) + "\n")
    return out


class PeakMemory:
    """VmHWM of every process whose environment carries this run's tag, polled until stopped."""

    def __init__(self, tag: str):
        self.tag, self.peaks, self._stop = tag.encode(), {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def _poll(self):
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                    if self.tag not in env.split(b"\0"):  # the whole entry: "peer-0" is not "peer-01"
                        continue
                    rank = next((v.split(b"=", 1)[1].decode() for v in env.split(b"\0")
                                 if v.startswith(b"LOCAL_RANK=")), None)
                    if rank is None:
                        continue  # the launcher itself
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                            if line.startswith("VmHWM:")), None)
                if hwm is None:
                    continue  # a rank exiting (or exited, not yet reaped) has no memory lines left
                self.peaks[rank] = max(self.peaks.get(rank, 0), hwm)
            time.sleep(0.1)


def free_port() -> int:
    """A free TCP port for the launcher's rendezvous: another DeepSpeed job on the machine (a test run, say)
    may hold the default 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list, tag: str, log: Path) -> tuple[float, dict]:
    tag = f"{os.getpid()}-{tag}"  # another benchmark driver on the machine uses the same variant names
    # A fixed glibc mmap threshold for every variant alike (as launch/bench_train.py): freed activations go
    # back to the OS, so the resident set follows the live tensors instead of the allocator's arenas.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MEDCARE_BENCH_TAG": tag, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
    t0 = time.perf_counter()
    with PeakMemory(f"MEDCARE_BENCH_TAG={tag}") as mem, open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--master_port", str(free_port()), *argv],
                              env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(argv[:3])} exited {proc.returncode}; see {log}")
    return wall, {k: mem.peaks[k] for k in sorted(mem.peaks)}


def with_recorded_peaks(polled: dict, out: Path) -> dict:
    """Our ranks reset VmHWM at each phase (medcare_dist.training.host_memory), so a peak in the last 0.1 s of
    a phase can fall between two polls; their own record of every phase's peak closes that gap."""
    recorded = json.loads((out / "host_memory.json").read_text())["ranks"]
    peaks = dict(polled)
    for rank, r in enumerate(recorded):
        top = max((ph["peak"] for ph in r["phases"].values()), default=0)
        peaks[str(rank)] = max(peaks.get(str(rank), 0), top)
    return peaks


def run_variant(variant: str, s: dict, inputs: dict, root: Path, n: int, stage1_dir: Path = None) -> dict:
    """One variant's launch; stage 2 starts from stage1_dir (a finished stage-1 output_dir) when given, else
    from a one-step stage 1 run once under root."""
    out = root / f"{variant}-{n}"
    common = [f"data.max_length={s['max_length']}", f"stage1.max_steps={s['steps']}",
              f"stage2.max_steps={s['steps']}", f"stage1.micro_batch_size={s['micro']}",
              f"stage2.micro_batch_size={s['micro']}", f"stage1.global_batch_size={s['global']}",
              f"stage2.global_batch_size={s['global']}", "data.stage2_replay=0", "logging.report_to=[]",
              "logging.progress_bar=false", "evaluation.report_models=[]", "evaluation.general_retention=false",
              "stage1.save_every=0", "stage2.save_every=0", f"model.path={inputs['model']}",
              f"data.stage1=[{inputs['samples']}]", f"data.stage2=[{inputs['samples']}]", "data.demo=false",
              f"model.gradient_checkpointing={str(s.get('ours_checkpointing', False)).lower()}"]
    recipe = ["launch/train.py", "--recipe", "launch/recipes/demo.yaml"]
    if variant == "peer":
        spec = {"model": inputs["model"], "rows": inputs["rows"], "out": str(out), "result": str(out) + ".json",
                "micro": s["micro"], "global": s["global"], "steps": s["steps"]}
        spec_path = root / f"peer-{n}.spec.json"
        spec_path.write_text(json.dumps(spec))
        wall, peaks = launch(["launch/bench_peer.py", "--worker", "peer", "--spec", str(spec_path)], f"peer-{n}",
                             root / f"peer-{n}.log")
        res = json.loads(Path(spec["result"]).read_text())
    elif variant == "stage1":
        wall, peaks = launch([*recipe, f"output_dir={out}", "stage=1", *common], f"stage1-{n}", root / f"stage1-{n}.log")
        res = json.loads((out / "stage1" / "result.json").read_text())["summary"]
    else:
        base = stage1_dir or root / "stage1-for-stage2"
        if not (base / "merged_base" / "config.json").is_file():
            launch([*recipe, f"output_dir={base}", "stage=1", *common, "stage1.max_steps=1"], "prep",
                   root / "prep.log")
        wall, peaks = launch([*recipe, f"output_dir={out}", "stage=2", f"init_from={base}", *common],
                             f"stage2-{n}", root / f"stage2-{n}.log")
        res = json.loads((out / "stage2" / "result.json").read_text())["summary"]
    if variant != "peer":
        peaks = with_recorded_peaks(peaks, out)
    return {"tokens_per_s": res["tokens_per_s"], "train_seconds": res["seconds"], "wall_seconds": wall,
            "peak_rss_bytes": peaks, "peak_rss_max_bytes": max(peaks.values()) if peaks else None,
            **({"trainable_parameters": res["trainable_parameters"]} if "trainable_parameters" in res else {})}


def main(argv=None):
    args = parse_args(argv)
    if args.worker == "peer":
        return peer_worker(json.loads(Path(args.spec).read_text()))
    s = settings(args)
    root = Path(tempfile.mkdtemp(prefix="bench_peer-"))
    inputs = build_inputs(s, root)
    runs = {v: [] for v in VARIANTS}
    for n in range(args.rounds):
        for v in VARIANTS:
            print(f"round {n + 1}/{args.rounds}: {v}", file=sys.stderr, flush=True)
            runs[v].append(run_variant(v, s, inputs, root, n))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "train_seconds", "wall_seconds",
                                                                 "peak_rss_max_bytes")} for v, rs in runs.items()}
    peer = med["peer"]
    ratios = {v: {"tokens_per_s": med[v]["tokens_per_s"] / peer["tokens_per_s"],
                  "peak_rss": med[v]["peak_rss_max_bytes"] / peer["peak_rss_max_bytes"]} for v in ("stage2", "stage1")}
    report = {"settings": s, "inputs": {k: inputs[k] for k in ("parameters", "samples_tokenized")},
              "runs": runs, "median": med, "ratios_vs_peer": ratios,
              "targets": {"stage2 tokens/s >= 1.5x peer": ratios["stage2"]["tokens_per_s"] >= 1.5,
                          "stage2 peak memory <= 0.7x peer": ratios["stage2"]["peak_rss"] <= 0.7,
                          "stage1 tokens/s >= 1.0x peer": ratios["stage1"]["tokens_per_s"] >= 1.0},
              "work_dir": str(root)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    lines = [f"model: Qwen2-shaped, {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']} "
             f"({inputs['parameters'] / 1e6:.1f}M parameters); {inputs['samples_tokenized']} samples, max_length "
             f"{s['max_length']}, global batch {s['global']} (micro {s['micro']}, 2 ranks), {s['steps']} steps",
             "| variant | tokens/s | x peer | peak RSS per rank (max) | x peer | train s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        m = med[v]
        r = ratios.get(v, {"tokens_per_s": 1.0, "peak_rss": 1.0})
        lines.append(f"| {v} | {m['tokens_per_s']:.0f} | {r['tokens_per_s']:.2f} | "
                     f"{m['peak_rss_max_bytes'] / 2**30:.2f} GiB | {r['peak_rss']:.2f} | {m['train_seconds']:.1f} | "
                     f"{m['wall_seconds']:.1f} |")
    lines += [f"target {k}: {'met' if ok else 'NOT met'}" for k, ok in report["targets"].items()]
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
