"""The whole training step, side by side: the reference implementation's way vs medcare-dist's.

    python launch/bench_train.py            # CPU: 2 layers at 1.8B shapes, 32k vocab; GPU: the real 1.8B
    python launch/bench_train.py --quick    # CPU, a few minutes
    python launch/bench_train.py --quick --json          # the JSON report on stdout
    python launch/bench_train.py --stage 1 --steps 5 --out runs/bench_train.json

Both variants train the same model (same seed, same weights, same adapters),
on the same samples, with the same global batch (in samples), maximum
sequence length, micro-batch size and number of optimizer steps:

  baseline  written here the way the reference (BlueZeros/MedCare) trains: an
            HF-Trainer-style loop (micro-batches padded to their longest
            sample, loss.backward per micro-batch, clip, AdamW, scheduler);
            every routed expert run on every token and the outputs stacked
            [E, T, out] before the top-k is gathered; logits over the whole
            vocabulary upcast to fp32 plus a shifted `.contiguous()` copy and
            CrossEntropyLoss; HF gradient checkpointing of every decoder layer
            (the reference runs with --gradient_checkpointing True); in stage
            2 the soft orthogonality penalty found by scanning all parameter
            names for each (base, orth) pair every micro-step.
  ours      medcare-dist's step, in the same plain single-process loop:
            MixtureOfLoRALinear / OrthogonalLoRALinear as put in by
            medcare_dist.method.injection (shrink-gate-expand, penalties inside the
            layer), packed micro-batches (medcare_dist.training.packing: rows of up to
            max_length with restarting position_ids, no padding between
            samples), the chunked lm_head loss (medcare_dist.training.loss: logits only
            for labelled positions, chunk by chunk, gradients in the forward),
            reentrant gradient checkpointing of every decoder layer like the
            baseline (--ours-checkpointing none / every:N to trade memory for
            speed), the lm_head and its loss outside the checkpoints, fused
            AdamW; in stage 2 the same soft penalty as the baseline (computed
            inside the layers; --orthogonality hard for the project's default).

Neither uses DeepSpeed here: one process, no communication (the JSON says
so: communication_s = 0). What is compared is the per-rank step; under
ZeRO-3 both would add the same all-gathers of the frozen backbone.

Each variant of each stage runs in its own subprocess (the script re-invokes
itself with --variant), so peaks do not mix; both processes of a stage are
alive together and take their timed optimizer steps in turn (baseline, ours,
ours, baseline, ...), so a change in the machine's load during the run hits
both alike (--sequential runs them one after the other). Peak memory is the process's
resident-set high-water mark over training (VmHWM, reset after the model is
built; the whole-process ru_maxrss is reported too; both children run with a
fixed glibc mmap threshold, CHILD_ENV, so that freed activations go back to
the OS and the RSS follows the live tensors) on the CPU, and
torch.cuda.max_memory_allocated on a GPU. tokens_per_s counts real (non-padding)
tokens. The time of every optimizer step is split into data (collate),
forward (incl. the loss), backward, optimizer (clip + step + zero_grad) and
communication. Model FLOPs count what the step needs: the frozen backbone's
forward and input-gradient GEMMs, the adapters (top-k experts only), attention
per sample, and the lm_head on labelled positions; MFU = model FLOPs / time /
peak, reported where the peak is known (GPU table or --peak-tflops).
tokens_per_cpu_s (tokens per CPU-second of the process) is reported beside
tokens_per_s: on a shared machine it is the less load-sensitive of the two.

Data: synthetic SFT conversations (random token ids): lengths drawn from a
log-normal around --length-frac x max_length (clipped to [32, max_length]),
the first 30-70% of each sample a prompt without labels. --fixed-lengths makes
every sample max_length long with the same prompt share (no padding at all:
what packing cannot help with).
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

QWEN_1_8B = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_key_value_heads": 16,
             "num_hidden_layers": 24, "vocab_size": 151936}
# Dense bf16 peaks (TFLOP/s) for MFU on GPUs, by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
TARGETS = {"speedup_tokens_per_s_min": 2.0, "peak_memory_ratio_max": 0.5}


# ----------------------------------------------------------------------------------------------- settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized run of a few minutes")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout (the table goes to stderr)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_train.json"), help="JSON report path")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (CPU default 2, GPU 24)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (CPU default 32000, GPU 151936)")
    p.add_argument("--max-length", type=int, default=None, help="max sequence length (CPU 1024, GPU 3072)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch (reference: 4)")
    p.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (CPU 8, GPU 32)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per stage")
    p.add_argument("--warmup", type=int, default=1, help="untimed micro-batches before the timed steps")
    p.add_argument("--length-frac", type=float, default=0.35, help="median sample length / max_length")
    p.add_argument("--fixed-lengths", action="store_true", help="every sample max_length tokens (no padding)")
    p.add_argument("--ours-checkpointing", default="full",
                   help="ours: full (default) = every decoder layer, reentrant, as the baseline and the project's "
                        "recipes; none = no recompute; every:N = every N-th layer (HF every_n_layers)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="ours: lm_head rows per chunk (auto: ~256 MiB)")
    p.add_argument("--orthogonality", default="soft", choices=["soft", "hard"],
                   help="ours in stage 2: soft = the reference's objective (default, like for like), hard = "
                        "the project's default projection")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (GPU: from a table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sequential", action="store_true",
                   help="run the two variants one after the other instead of alternating optimizer steps")
    return p.parse_args(argv)


def resolve(args) -> dict:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if gpu else "fp32")
    s = {
        "device": device, "dtype": dtype,
        "layers": args.layers or (QWEN_1_8B["num_hidden_layers"] if gpu else 2),
        "vocab": args.vocab or (QWEN_1_8B["vocab_size"] if gpu else 32000),
        "max_length": args.max_length or (3072 if gpu else 1024),
        "micro_batch": args.micro_batch,
        "global_batch": args.global_batch or (32 if gpu else 8),
        "steps": args.steps or ((3 if args.quick else 5) if gpu else (2 if args.quick else 4)),
        "warmup": args.warmup, "length_frac": args.length_frac, "fixed_lengths": args.fixed_lengths,
        "ours_checkpointing": args.ours_checkpointing, "chunk_tokens": args.chunk_tokens,
        "orthogonality": args.orthogonality, "seed": args.seed, "quick": args.quick,
        "peak_tflops": args.peak_tflops,
    }
    if s["global_batch"] % s["micro_batch"]:
        raise SystemExit(f"--global-batch {s['global_batch']} is not a multiple of --micro-batch {s['micro_batch']}")
    ck = s["ours_checkpointing"]
    if not (ck in ("full", "none") or (ck.startswith("every:") and ck[6:].isdigit() and int(ck[6:]) > 0)):
        raise SystemExit(f"--ours-checkpointing {ck!r}: expected full, none or every:N")
    return s


def model_config(s):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=s["vocab"], hidden_size=QWEN_1_8B["hidden_size"], intermediate_size=QWEN_1_8B["intermediate_size"],
        num_hidden_layers=s["layers"], num_attention_heads=QWEN_1_8B["num_attention_heads"],
        num_key_value_heads=QWEN_1_8B["num_key_value_heads"], max_position_embeddings=max(4096, s["max_length"]),
        tie_word_embeddings=False, use_cache=False, rope_theta=1000000.0, rms_norm_eps=1e-6)


def adapter_config(s):
    from medcare_dist.config import AdapterConfig

    # The paper's setting (launch/recipes/qwen1.5-1.8b.yaml).
    return AdapterConfig(attn_rank=16, attn_alpha=32, attn_dropout=0.05, expert_rank=16, expert_alpha=32,
                         num_experts=8, top_k=2, shared_rank=32, expert_dropout=0.0, router_aux_loss_coef=0.0,
                         align_rank=32, align_alpha=64, orthogonality=s["orthogonality"], orthogonality_lambda=1.0,
                         freeze_knowledge=False)


# ----------------------------------------------------------------------------------------------- data

def make_samples(s, n):
    """n synthetic SFT samples: {"input_ids", "labels"} with an unlabelled prompt share of 30-70%."""
    import torch

    g = torch.Generator().manual_seed(s["seed"] + 7)
    L = s["max_length"]
    out = []
    for _ in range(n):
        if s["fixed_lengths"]:
            length = L
        else:
            z = float(torch.randn((), generator=g))
            length = int(min(L, max(32, round(s["length_frac"] * L * math.exp(0.6 * z)))))
        prompt = max(1, int(length * (0.3 + 0.4 * float(torch.rand((), generator=g)))))
        ids = torch.randint(3, s["vocab"], (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def step_batches(s, samples, step):
    """The micro-batches (lists of samples) of optimizer step `step`; the same for both variants."""
    gb, mb = s["global_batch"], s["micro_batch"]
    chunk = samples[step * gb:(step + 1) * gb]
    return [chunk[j:j + mb] for j in range(0, gb, mb)]


def pad_collate(batch, pad_id=0):
    """The reference's DataCollatorForSupervisedDataset: right-pad to the longest, mask = ids != pad."""
    import torch

    length = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(pad_id)}


# ----------------------------------------------------------------------------------------------- the baseline's layers

def _reference_classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RefMoLoRALinear(nn.Module):
        """The reference's MoLoRALinear (training path, `molora_helper2`), holding our layer's weights.

        Every expert runs on every token, the outputs are stacked [E, T, out],
        the top-k gathered and mixed with the shared expert by an einsum.
        """

        def __init__(self, layer):
            super().__init__()
            d_in, d_out = layer.in_features, layer.out_features
            kw = {"dtype": layer.expert_A.dtype, "device": layer.expert_A.device}
            self.weight, self.bias = layer.base.weight, layer.base.bias
            self.out_features, self.num_experts, self.top_k = d_out, layer.num_experts, layer.top_k
            self.scaling = layer.scaling
            self.switch = nn.Linear(d_in, layer.num_experts, **kw)
            self.experts = nn.ModuleList([nn.ModuleDict({
                f"lora_A_{i}": nn.Linear(d_in, layer.rank, bias=False, **kw),
                f"lora_B_{i}": nn.Linear(layer.rank, d_out, bias=False, **kw)}) for i in range(layer.num_experts)])
            self.share_experts = nn.ModuleDict({"lora_A": nn.Linear(d_in, layer.shared_rank, bias=False, **kw),
                                                "lora_B": nn.Linear(layer.shared_rank, d_out, bias=False, **kw)})
            with torch.no_grad():
                self.switch.weight.copy_(layer.router.weight)
                self.switch.bias.copy_(layer.router.bias)
                for i, ex in enumerate(self.experts):
                    ex[f"lora_A_{i}"].weight.copy_(layer.expert_A[i])
                    ex[f"lora_B_{i}"].weight.copy_(layer.expert_B[i])
                self.share_experts["lora_A"].weight.copy_(layer.shared_A)
                self.share_experts["lora_B"].weight.copy_(layer.shared_B)

        def forward(self, x):
            result = F.linear(x, self.weight, self.bias)
            previous_dtype = x.dtype
            batch_size, n, d = x.shape
            x = x.contiguous().view(-1, d).to(self.experts[0]["lora_A_0"].weight.dtype)
            share = self.share_experts["lora_B"](self.share_experts["lora_A"](x)) * self.scaling
            gate_logits = self.switch(x)
            temp = torch.stack([ex[f"lora_B_{i}"](ex[f"lora_A_{i}"](x)) * self.scaling
                                for i, ex in enumerate(self.experts)], dim=0)        # [E, T, out]
            temp = temp.transpose(0, 1)                                              # [T, E, out]
            probs = gate_logits.softmax(-1)
            weights, selected = torch.topk(probs, self.top_k)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            picked = temp.gather(1, selected.unsqueeze(-1).expand(-1, -1, self.out_features))
            weights = torch.cat([weights, torch.ones(weights.shape[0], 1).to(weights)], dim=-1)
            picked = torch.cat([picked, share.unsqueeze(1)], dim=1)
            moe = torch.einsum("be,bef->bf", weights, picked).contiguous().view(batch_size, n, -1)
            result += moe.to(previous_dtype)
            return result

    class RefOrthLoRALinear(nn.Module):
        """The reference's OrthLoRALinear: base (Knowledge Aggregator) and orth LoRA as nn.Linear pairs."""

        def __init__(self, layer):
            super().__init__()
            d_in, d_out = layer.in_features, layer.out_features
            kw = {"dtype": layer.align_A.dtype, "device": layer.align_A.device}
            self.weight, self.bias = layer.base.weight, layer.base.bias
            self.scaling = layer.scaling
            self.lora_dropout = nn.Dropout(layer.dropout_p) if layer.dropout_p > 0 else nn.Identity()
            self.base = nn.ModuleDict({"lora_A": nn.Linear(d_in, layer.knowledge_rank, bias=False, **kw),
                                       "lora_B": nn.Linear(layer.knowledge_rank, d_out, bias=False, **kw)})
            self.orth = nn.ModuleDict({"lora_A": nn.Linear(d_in, layer.rank, bias=False, **kw),
                                       "lora_B": nn.Linear(layer.rank, d_out, bias=False, **kw)})
            with torch.no_grad():
                self.base["lora_A"].weight.copy_(layer.knowledge_A)
                self.base["lora_B"].weight.copy_(layer.knowledge_B)
                self.orth["lora_A"].weight.copy_(layer.align_A)
                self.orth["lora_B"].weight.copy_(layer.align_B)

        def forward(self, x):
            previous_dtype = x.dtype
            result = F.linear(x, self.weight, bias=self.bias)
            x = self.lora_dropout(x.to(self.base["lora_A"].weight.dtype))
            result += self.base["lora_B"](self.base["lora_A"](x)) * self.scaling
            result += self.orth["lora_B"](self.orth["lora_A"](x)) * self.scaling
            return result.to(previous_dtype)

    return RefMoLoRALinear, RefOrthLoRALinear


def reference_orthogonal_penalty(model):
    """The reference's soft penalty: for each base lora_A, scan every parameter name for its orth partner."""
    import torch

    total = None
    for name, param in model.named_parameters():
        if "base." in name and "lora_A" in name:
            prefix = name.split("base.")[0]
            for name_, param_ in model.named_parameters():
                if prefix + "orth" in name_ and "lora_A" in name_:
                    term = torch.abs(torch.mm(param.float(), param_.float().T)).sum()
                    total = term if total is None else total + term
                    break
    return total


def reference_lm_loss(model, batch):
    """The reference's MoLoRAQwenForCausalLM.forward loss: fp32 logits, shifted contiguous copies, mean CE."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(hidden).float()
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
    shift_labels = batch["labels"][..., 1:].contiguous().view(-1)
    return F.cross_entropy(shift_logits, shift_labels)


# ----------------------------------------------------------------------------------------------- models

def build_model(s, stage, variant):
    import torch
    from transformers import Qwen2ForCausalLM

    from medcare_dist.method.injection import (add_stage1_adapters, add_stage2_adapters, adapter_layers,
                                        merge_attention_lora, replace_module)
    from medcare_dist.method.adapters import MixtureOfLoRALinear, OrthogonalLoRALinear

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[s["dtype"]]
    torch.manual_seed(s["seed"])
    cfg = model_config(s)
    cfg._attn_implementation = "sdpa"
    with torch.device(s["device"]):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    acfg = adapter_config(s)
    torch.manual_seed(s["seed"] + 1)
    add_stage1_adapters(model, acfg)
    if stage == 2:
        merge_attention_lora(model)
        torch.manual_seed(s["seed"] + 2)
        add_stage2_adapters(model, acfg)
    if variant == "baseline":
        RefMoLoRALinear, RefOrthLoRALinear = _reference_classes()
        for name, layer in adapter_layers(model, MixtureOfLoRALinear):
            replace_module(model, name, RefMoLoRALinear(layer))
        for name, layer in adapter_layers(model, OrthogonalLoRALinear):
            replace_module(model, name, RefOrthLoRALinear(layer))
        for n, p in model.named_parameters():   # the reference's mark_only_lora_as_trainable
            p.requires_grad_("lora" in n or "switch" in n)
    return model


# ----------------------------------------------------------------------------------------------- memory & time

class Meter:
    def __init__(self, device):
        import torch

        self.device = device
        self.cuda = device == "cuda"
        self.torch = torch

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self):
        self.sync()
        return time.perf_counter()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return
        try:  # reset VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> dict:
        out = {"process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.cuda:
            out["peak_bytes"] = self.torch.cuda.max_memory_allocated()
            out["peak_kind"] = "torch.cuda.max_memory_allocated"
            return out
        hwm = None
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
        except OSError:
            pass
        out["peak_bytes"] = hwm if hwm is not None else out["process_max_rss_bytes"]
        out["peak_kind"] = "RSS high-water mark (VmHWM) over training"
        return out


# ----------------------------------------------------------------------------------------------- FLOPs

def model_flops(s, stage, samples):
    """FLOPs the step needs for these samples (no padding, no recompute, lm_head on labelled positions)."""
    H, I = QWEN_1_8B["hidden_size"], QWEN_1_8B["intermediate_size"]
    heads, kv = QWEN_1_8B["num_attention_heads"], QWEN_1_8B["num_key_value_heads"]
    kv_dim = H // heads * kv
    L, V = s["layers"], s["vocab"]
    a = adapter_config(s)
    frozen = 2 * H * H + 2 * H * kv_dim + 3 * H * I                  # q, o, k, v, gate, up, down
    mlp_io = [(H, I), (H, I), (I, H)]
    if stage == 1:
        attn_io = [(H, H), (H, kv_dim), (H, kv_dim), (H, H)]
        adapter = sum(a.attn_rank * (i + o) for i, o in attn_io)
        adapter += sum((a.shared_rank + a.top_k * a.expert_rank) * (i + o) + a.num_experts * i for i, o in mlp_io)
    else:
        adapter = sum((a.shared_rank + a.align_rank) * (i + o) for i, o in mlp_io)
    tokens = sum(len(x["input_ids"]) for x in samples)
    labelled = sum(sum(1 for t in x["labels"][1:] if t != -100) for x in samples)
    per_token = L * (4 * frozen + 6 * adapter)                        # frozen: forward + input gradient only
    attention = sum(L * 12 * H * len(x["input_ids"]) ** 2 for x in samples) // 2   # causal half, fwd + bwd
    return tokens * per_token + attention + labelled * 4 * H * V


# ----------------------------------------------------------------------------------------------- the loops

def run_variant(s, stage, variant, lockstep=False) -> dict:
    import torch

    from medcare_dist.method.injection import set_penalty_grad_scale
    from medcare_dist.training.loss import install_chunked_lm_head, lm_loss_from_output
    from medcare_dist.training.packing import collate_packed
    from medcare_dist.training.zero import stop_backward_at_embedding

    meter = Meter(s["device"])
    n_samples = s["global_batch"] * s["steps"]
    samples = make_samples(s, n_samples)
    warm = make_samples({**s, "seed": s["seed"] + 99}, s["micro_batch"] * max(1, s["warmup"]))
    model = build_model(s, stage, variant)
    model.train()
    accum = s["global_batch"] // s["micro_batch"]
    dev = s["device"]
    head = None
    if variant == "baseline":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    else:
        head = install_chunked_lm_head(model, s["chunk_tokens"])
        ck = s["ours_checkpointing"]
        if ck != "none":
            # Reentrant, as medcare_dist.training.modeling.enable_gradient_checkpointing (ZeRO-3 safe); the lm_head and
            # its chunked loss stay outside every checkpoint, so their gradients are computed exactly once.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True},
                                                every_n_layers=1 if ck == "full" else int(ck[6:]))
        stop_backward_at_embedding(model)  # as the trainer does
        set_penalty_grad_scale(model, 1.0 / accum)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    # The reference's HF Trainer uses optim="adamw_torch" (torch's default AdamW); ours takes the fused kernel
    # (one pass over each tensor; CPU and CUDA since torch 2.4), as the trainer does.
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, **({"fused": True} if variant == "ours" else {}))
    total_steps = s["steps"] + 1
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / max(1, math.ceil(0.03 * total_steps))))

    def micro_step(batch_samples, n_global):
        t0 = meter.now()
        if variant == "baseline":
            batch = {k: v.to(dev) for k, v in pad_collate(batch_samples).items()}
            real = int(batch["attention_mask"].sum())
            slots = batch["input_ids"].numel()
            t1 = meter.now()
            loss = reference_lm_loss(model, batch) / accum
            if stage == 2:
                penalty = reference_orthogonal_penalty(model)
                # the reference logs both terms with .item() every micro-step
                _ = (penalty.item(), loss.item())
                loss = loss + 1.0 * penalty
            t2 = meter.now()
            loss.backward()
        else:
            batch = {k: v.to(dev) for k, v in collate_packed(batch_samples, 0, s["max_length"], 8).items()}
            real = int(batch["num_tokens"])
            slots = batch["input_ids"].numel()
            t1 = meter.now()
            with head.loss_for(batch["labels"]):
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            loss = lm_loss_from_output(out) / n_global
            t2 = meter.now()
            loss.backward()
        t3 = meter.now()
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2}, real, slots, float(loss.detach())

    def opt_step():
        t0 = meter.now()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return meter.now() - t0

    meter.reset_peak()
    # Warm-up (untimed): allocator, kernels, optimizer state.
    for j in range(max(1, s["warmup"])):
        chunk = warm[j * s["micro_batch"]:(j + 1) * s["micro_batch"]]
        n = sum(sum(1 for t in x["labels"][1:] if t != -100) for x in chunk)
        micro_step(chunk, max(1, n))
    opt_step()

    split = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "communication": 0.0}
    real_tokens = slots = 0
    losses = []
    elapsed = cpu_s = 0.0
    if lockstep:
        print("READY", flush=True)
    for step in range(s["steps"]):
        if lockstep and sys.stdin.readline().strip() != "go":   # the driver alternates the two variants
            raise SystemExit("lockstep: driver went away")
        mbs = step_batches(s, samples, step)
        n_global = max(1, sum(sum(1 for t in x["labels"][1:] if t != -100) for mb in mbs for x in mb))
        step_loss = 0.0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = meter.now()
        for mb in mbs:
            t, r, sl, lv = micro_step(mb, n_global)
            for k, v in t.items():
                split[k] += v
            real_tokens += r
            slots += sl
            step_loss += lv
        split["optimizer"] += opt_step()
        dt = meter.now() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed += dt
        cpu_s += (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        losses.append(step_loss)  # baseline: mean of per-micro-batch means; ours: global token mean
        if lockstep:
            print(f"STEP {step} {dt:.3f}", flush=True)
    flops = model_flops(s, stage, samples)
    peak_tflops = s["peak_tflops"]
    if peak_tflops is None and meter.cuda:
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    res = {
        "variant": variant, "stage": stage, "steps": s["steps"], "seconds": elapsed,
        "tokens": real_tokens, "token_slots": slots, "padding_fraction": 1 - real_tokens / slots,
        "tokens_per_s": real_tokens / elapsed, "time_split_s": split,
        "cpu_seconds": cpu_s, "tokens_per_cpu_s": real_tokens / cpu_s if cpu_s > 0 else None,
        "model_flops": flops, "model_tflops_per_s": flops / elapsed / 1e12,
        "mfu": (flops / elapsed / 1e12 / peak_tflops) if peak_tflops else None, "peak_tflops": peak_tflops,
        "trainable_params": n_trainable, "losses": losses,
        "gradient_checkpointing": "full" if variant == "baseline" else s["ours_checkpointing"],
    }
    res.update(meter.peak())
    return res


# ----------------------------------------------------------------------------------------------- driver

def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
        info["cpus"] = os.cpu_count()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# glibc's dynamic mmap threshold grows to 32 MiB after the first large free, after which freed activations
# below it stay in the heap and the RSS no longer follows the live tensors (it over-counts whichever variant
# allocates many mid-sized tensors). A fixed threshold makes large blocks come from mmap and go back on free,
# so RSS tracks live memory; both variants run under the same setting.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def _spawn(argv, variant, stage, lockstep):
    import tempfile

    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant, "--stage", str(stage)]
    if lockstep:
        cmd.append("--lockstep")
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, **CHILD_ENV}, bufsize=1)
    proc.err_file = err
    return proc


def _fail(proc, what):
    proc.err_file.seek(0)
    sys.stderr.write(proc.err_file.read()[-4000:])
    raise SystemExit(what)


def _read_until(proc, prefix, what):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    proc.wait()
    _fail(proc, f"{what}: exited ({proc.returncode}) before printing {prefix.strip()}")


def _finish(proc, what) -> dict:
    line = _read_until(proc, "BENCH_RESULT ", what)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = json.loads(line[len("BENCH_RESULT "):])
    res["child_ru_maxrss_bytes"] = ru.ru_maxrss * 1024
    return res


def run_pair(argv, stage, steps, sequential=False) -> dict:
    """Both variants of one stage. By default both processes are alive at once and the driver lets them
    take optimizer steps in turn (baseline, ours, ours, baseline, ...), so a slow drift in the machine's
    load hits both alike; each process still has its own memory, so peaks do not mix."""
    variants = ("baseline", "ours")
    if sequential:
        out = {}
        for v in variants:
            proc = _spawn(argv, v, stage, lockstep=False)
            out[v] = _finish(proc, f"{v} stage {stage}")
        return out
    procs = {v: _spawn(argv, v, stage, lockstep=True) for v in variants}
    for v, p in procs.items():
        _read_until(p, "READY", f"{v} stage {stage}")
    for step in range(steps):
        order = variants if step % 2 == 0 else variants[::-1]
        for v in order:
            procs[v].stdin.write("go\n")
            procs[v].stdin.flush()
            line = _read_until(procs[v], "STEP ", f"{v} stage {stage}")
            print(f"[bench_train]   stage {stage} step {step + 1}/{steps} {v}: {float(line.split()[2]):.1f} s",
                  file=sys.stderr, flush=True)
    return {v: _finish(p, f"{v} stage {stage}") for v, p in procs.items()}


def combine(results: list[dict]) -> dict:
    seconds = sum(r["seconds"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    split = {k: sum(r["time_split_s"][k] for r in results) for k in results[0]["time_split_s"]}
    flops = sum(r["model_flops"] for r in results)
    peak_tflops = results[0]["peak_tflops"]
    cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
        "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "peak_bytes": max(r["peak_bytes"] for r in results),
        "process_max_rss_bytes": max(r.get("process_max_rss_bytes", 0) for r in results),
        "time_split_s": split, "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None,
        "padding_fraction": 1 - tokens / sum(r["token_slots"] for r in results),
        "gradient_checkpointing": results[0]["gradient_checkpointing"],
    }


def fmt_table(report) -> str:
    gib = 2**30
    rows = [f"{'':24s}{'baseline':>14s}{'ours':>14s}{'ratio':>10s}"]
    b, o = report["baseline"], report["ours"]
    rows.append(f"{'tokens/s':24s}{b['tokens_per_s']:14.1f}{o['tokens_per_s']:14.1f}"
                f"{report['speedup_tokens_per_s']:9.2f}x")
    if report.get("speedup_tokens_per_cpu_s"):
        rows.append(f"{'tokens/CPU-s':24s}{b['tokens_per_cpu_s']:14.1f}{o['tokens_per_cpu_s']:14.1f}"
                    f"{report['speedup_tokens_per_cpu_s']:9.2f}x")
    rows.append(f"{'peak memory (GiB)':24s}{b['peak_bytes'] / gib:14.2f}{o['peak_bytes'] / gib:14.2f}"
                f"{report['peak_memory_ratio']:10.2f}")
    for k in b["time_split_s"]:
        rows.append(f"{'  ' + k + ' (s)':24s}{b['time_split_s'][k]:14.2f}{o['time_split_s'][k]:14.2f}")
    rows.append(f"{'padding fraction':24s}{b['padding_fraction']:14.2f}{o['padding_fraction']:14.2f}")
    rows.append(f"{'model TFLOP/s':24s}{b['model_tflops_per_s']:14.3f}{o['model_tflops_per_s']:14.3f}")
    if o["mfu"] is not None:
        rows.append(f"{'MFU':24s}{b['mfu']:14.3f}{o['mfu']:14.3f}")
    for st, d in report["stages"].items():
        rows.append(f"{st}: speedup {d['speedup_tokens_per_s']:.2f}x ({d['speedup_tokens_per_cpu_s']:.2f}x per CPU-s), "
                    f"peak ratio {d['peak_memory_ratio']:.2f} "
                    f"(baseline {d['baseline']['tokens_per_s']:.1f} tok/s {d['baseline']['peak_bytes'] / gib:.2f} GiB,"
                    f" ours {d['ours']['tokens_per_s']:.1f} tok/s {d['ours']['peak_bytes'] / gib:.2f} GiB)")
    rows.append(f"targets: speedup >= {TARGETS['speedup_tokens_per_s_min']} "
                f"{'MET' if report['targets_met']['speedup'] else 'NOT MET'}, peak ratio <= "
                f"{TARGETS['peak_memory_ratio_max']} {'MET' if report['targets_met']['peak_memory'] else 'NOT MET'}")
    return "\n".join(rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = resolve(args)
    if args.variant:
        res = run_variant(s, int(args.stage), args.variant, lockstep=args.lockstep)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0
    child_argv = [a for a in argv if a not in ("--json", "--sequential")]
    # drop --stage/--out (the child gets its own --stage; it writes nothing)
    clean, skip = [], False
    for a in child_argv:
        if skip:
            skip = False
            continue
        if a in ("--stage", "--out"):
            skip = True
            continue
        if a.startswith("--stage=") or a.startswith("--out="):
            continue
        clean.append(a)
    stages = [1, 2] if args.stage == "both" else [int(args.stage)]
    info = machine()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    per_stage = {}
    for st in stages:
        print(f"[bench_train] stage {st}: baseline and ours ...", file=sys.stderr, flush=True)
        pair = run_pair(clean, st, s["steps"], sequential=args.sequential)
        for variant in ("baseline", "ours"):
            r = pair[variant]
            print(f"[bench_train]   {variant}: {r['tokens_per_s']:.1f} tokens/s, peak {r['peak_bytes'] / 2**30:.2f} GiB, "
                  f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)
        pair["speedup_tokens_per_s"] = pair["ours"]["tokens_per_s"] / pair["baseline"]["tokens_per_s"]
        pair["speedup_tokens_per_cpu_s"] = pair["ours"]["tokens_per_cpu_s"] / pair["baseline"]["tokens_per_cpu_s"]
        pair["peak_memory_ratio"] = pair["ours"]["peak_bytes"] / pair["baseline"]["peak_bytes"]
        per_stage[f"stage{st}"] = pair
    base = combine([per_stage[f"stage{st}"]["baseline"] for st in stages])
    ours = combine([per_stage[f"stage{st}"]["ours"] for st in stages])
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    report = {
        "date": started, "machine": info, "settings": s,
        "what": "per-rank training step, one process, no communication (communication_s = 0); "
                "tokens = real tokens; peak = RSS high-water mark on CPU / max allocated on GPU",
        "baseline": base, "ours": ours,
        "speedup_tokens_per_s": ours["tokens_per_s"] / base["tokens_per_s"],
        "speedup_tokens_per_cpu_s": (ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
                                     if ours["tokens_per_cpu_s"] and base["tokens_per_cpu_s"] else None),
        "peak_memory_ratio": ours["peak_bytes"] / base["peak_bytes"],
        "stages": per_stage, "targets": TARGETS,
    }
    report["targets_met"] = {"speedup": report["speedup_tokens_per_s"] >= TARGETS["speedup_tokens_per_s_min"],
                             "peak_memory": report["peak_memory_ratio"] <= TARGETS["peak_memory_ratio_max"]}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    table = fmt_table(report)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=1))
    else:
        print(table)
        if args.out:
            print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
