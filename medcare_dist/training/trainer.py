"""One training stage on a DeepSpeed engine: batches, the step, logs, checkpoints, resume.

The step, top to bottom (`StageTrainer.train`):
  for each optimizer step s:
    the global batch of step s is a fixed slice of a seeded per-epoch shuffle,
    cut into world * grad_accum micro-batches; this rank takes every world-th;
    count the loss tokens of the whole global batch (one all-reduce);
    for each micro-batch: forward, summed token loss / global token count,
    engine.backward, engine.step (DeepSpeed steps the optimizer on the last).
Because the batch of every step is a pure function of (seed, step), resuming
from step s needs only the engine state, the RNG states and s.
"""

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from medcare_dist.training import checkpoint as ckpt
from medcare_dist.training import preemption
from medcare_dist.training.faults import injected_failure, injected_nonfinite, poison
from medcare_dist.training.host_memory import release_free_heap
from medcare_dist.method.adapters import LoRALinear, MixtureOfLoRALinear, OrthogonalLoRALinear, _AdapterBase
from medcare_dist.training.distributed import all_reduce_sum
from medcare_dist.method.injection import last_penalty_total, pop_expert_counts, set_noise_aggregator_off, set_penalty_grad_scale
from medcare_dist.training.loss import ChunkedLMHead, lm_loss_from_output
from medcare_dist.method.orthogonal import orthogonality_residual
from medcare_dist.training.zero import stop_backward_at_embedding

log = logging.getLogger(__name__)


class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient; a checkpoint was saved first."""


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at an optimizer step: linear warm-up then cosine/linear/constant."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


def token_correct(logits, labels) -> torch.Tensor:
    """Labelled positions whose next-token argmax is their label (token accuracy's numerator)."""
    target = labels[:, 1:]
    return ((logits[:, :-1].argmax(dim=-1) == target) & (target != -100)).sum()


def token_loss_sum(logits, labels, chunk_tokens: int = 4096):
    """Sum of next-token cross-entropies over labelled positions, upcast to fp32 a chunk at a time."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        lab = labels[start:start + chunk_tokens]
        total = total + F.cross_entropy(logits[start:start + chunk_tokens].float(), lab,
                                        ignore_index=-100, reduction="sum")
    return total


# Dense bf16 peak TFLOP/s per GPU, matched on a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


class ModelFlops:
    """Model FLOPs of a training step: what the step needs, not what an implementation spends.

    Per token: the frozen linears' forward and input-gradient GEMMs (4 x in x out; no weight gradient),
    the adapters' forward and both gradients (6 x rank x (in + out); for a mixture-of-LoRA layer the
    Knowledge Aggregator, the top-k experts and the router); per sample of length s, causal attention
    6 x layers x hidden x s^2 (forward + backward); per labelled token the lm_head, 4 x hidden x vocab.
    Padding, recomputation and logits of unlabelled positions are not counted, so MFU = these FLOPs /
    time / peak compares implementations (launch/bench_train.py counts the same way).
    """

    def __init__(self, model):
        cfg = model.config
        head = model.get_output_embeddings()
        self.lm_head = 2 * _numel(head.weight)                     # 2 x hidden x vocab per direction
        self.attention = 6 * cfg.num_hidden_layers * cfg.hidden_size
        inside_adapters = set()
        frozen = adapter = 0
        for m in model.modules():
            if isinstance(m, _AdapterBase):
                inside_adapters.update(id(c) for c in m.modules() if isinstance(c, torch.nn.Linear))
                frozen += m.in_features * m.out_features
                io = m.in_features + m.out_features
                if isinstance(m, MixtureOfLoRALinear):
                    adapter += (m.shared_rank + m.top_k * m.rank) * io + m.num_experts * m.in_features
                elif isinstance(m, OrthogonalLoRALinear):
                    adapter += (m.knowledge_rank + m.rank) * io
                elif isinstance(m, LoRALinear):
                    adapter += m.rank * io
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and id(m) not in inside_adapters and m is not head:
                frozen += _numel(m.weight)
        self.per_token = 4 * frozen + 6 * adapter

    def step(self, lengths, n_loss_tokens) -> float:
        return (sum(lengths) * self.per_token + self.attention * sum(n * n for n in lengths)
                + 2 * self.lm_head * n_loss_tokens)


def device_peak_tflops(device, override: float = 0.0):
    """Peak TFLOP/s of one device for MFU: `override` if set, else the GPU table; None when unknown (CPU)."""
    if override:
        return float(override)
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return None


@dataclass
class StageResult:
    name: str
    steps: int = 0
    losses: list = field(default_factory=list)          # (step, mean token loss of the global batch)
    lrs: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    expert_counts: dict = field(default_factory=dict)   # layer -> [E] tokens routed, summed over ranks
    residuals: list = field(default_factory=list)       # (step, orthogonality residual)
    resumed_from: str | None = None
    skipped_steps: list = field(default_factory=list)   # (step, reason) of steps whose update was discarded
    model_flops: float = 0.0                            # summed over the stage and the ranks (ModelFlops)
    peak_tflops: float | None = None                    # of one device; MFU is reported when known
    world_size: int = 1
    val_losses: list = field(default_factory=list)      # (step, mean token loss over the validation rows)
    val_accuracies: list = field(default_factory=list)  # (step, share of validation tokens predicted exactly)
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early_at: int | None = None                 # early_stopping_patience ran out at this step

    def summary(self) -> dict:
        loss = [v for _, v in self.losses]
        head = loss[: max(1, len(loss) // 10)]
        tail = loss[-max(1, len(loss) // 10):]
        return {
            "steps": self.steps,
            "train_loss_first": loss[0] if loss else None,
            "train_loss_last": loss[-1] if loss else None,
            "train_loss_first_10pct_mean": sum(head) / len(head) if loss else None,
            "train_loss_last_10pct_mean": sum(tail) / len(tail) if loss else None,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "model_tflops_per_s": self.model_flops / self.seconds / 1e12 if self.seconds > 0 else None,
            "mfu": (self.model_flops / self.seconds / 1e12 / (self.peak_tflops * self.world_size)
                    if self.seconds > 0 and self.peak_tflops else None),
            "resumed_from": self.resumed_from,
            "skipped_steps": len(self.skipped_steps),
            "val_loss_last": self.val_losses[-1][1] if self.val_losses else None,
            "val_token_accuracy_last": self.val_accuracies[-1][1] if self.val_accuracies else None,
            "val_loss_best": self.best_val_loss,
            "best_step": self.best_step,
            "stopped_early_at": self.stopped_early_at,
        }

    def to_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_state(cls, state: dict) -> "StageResult":
        return cls(**state)


class StageTrainer:
    """Trains the adapter parameters of `model` on `dataset` for one stage."""

    def __init__(self, name, model, dataset, collate, stage_cfg, ds_config, out_dir, rank, world_size,
                 seed, logging_cfg, measure_orthogonality=False, trackers=None, max_nonfinite_steps=3,
                 resume_signature=None, noise_drop_prob=0.0, eval_dataset=None):
        import deepspeed

        self.name, self.rank, self.world = name, rank, world_size
        self.dataset, self.collate = dataset, collate
        self.eval_dataset = eval_dataset
        self.cfg, self.logging_cfg = stage_cfg, logging_cfg
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.measure_orthogonality = measure_orthogonality
        self.trackers = trackers
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.global_batch = ds_config["train_batch_size"]
        self.max_nonfinite_steps = max_nonfinite_steps
        self.resume_signature = resume_signature or {}
        self.fp16 = ds_config.get("fp16", {}).get("enabled", False)
        self.noise_drop_prob = noise_drop_prob

        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            from medcare_dist.data.conversations import DataError

            raise DataError(f"data.{name}: {len(dataset)} training samples are fewer than one global batch "
                            f"({name}.global_batch_size={self.global_batch}); lower it or add data")
        total = self.steps_per_epoch * stage_cfg.epochs
        self.total_steps = min(total, stage_cfg.max_steps) if stage_cfg.max_steps > 0 else total

        params = [p for p in model.parameters() if p.requires_grad]
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay,
                                         adamw_mode=True)
        else:
            # fused: one pass per tensor (CPU and CUDA, torch >= 2.4) instead of the for-each path's several;
            # on the 2-core CPU 2-10x faster for 10M adapter parameters, most on a loaded machine.
            optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay, fused=True)
        warmup = math.ceil(stage_cfg.warmup_ratio * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(stage_cfg.lr_scheduler, warmup, self.total_steps))
        with preemption.deferred():  # may JIT-build ops: a signal now is handled at the first step instead
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=ds_config)
        stop_backward_at_embedding(model)  # after ZeRO-3's hooks: the first layer's input is a leaf
        self.optimizer, self.scheduler = optimizer, scheduler
        self.model = model
        self.device = self.engine.device
        # The pipeline installs a ChunkedLMHead (medcare_dist.training.loss); without one the logits path is used.
        head = model.get_output_embeddings()
        self.head = head if isinstance(head, ChunkedLMHead) else None
        self.flops = ModelFlops(model)
        self.peak_tflops = device_peak_tflops(self.device, getattr(logging_cfg, "peak_tflops", 0.0))
        self.result = StageResult(name, peak_tflops=self.peak_tflops, world_size=world_size)
        self.start_step = 0

    # ----- data -------------------------------------------------------------
    def _global_indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        return perm[within * self.global_batch:(within + 1) * self.global_batch].tolist()

    def _micro_batches(self, step: int):
        idx = self._global_indices(step)
        chunks = [idx[j * self.micro:(j + 1) * self.micro] for j in range(self.world * self.grad_accum)]
        # Micro-batch j goes to rank j % world: 1 rank with accumulation and
        # N ranks without see the same micro-batches, hence the same step.
        rows = [[self.dataset[i] for i in chunk] for chunk in chunks[self.rank::self.world]]
        mine = [self.collate(r) for r in rows]
        for j, batch in zip(range(self.rank, len(chunks), self.world), mine):
            batch["noise_off"] = self._noise_off(step, j)
        # Position 0 of a sample is never predicted; packed rows label each sample's first token -100,
        # so this count is the same packed or not.
        n_loss_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mine)
        flops = self.flops.step([len(x["input_ids"]) for r in rows for x in r], n_loss_tokens)
        return mine, n_loss_tokens, flops

    def _noise_off(self, step: int, micro_index: int) -> bool:
        """Whether micro-batch `micro_index` of `step` trains with the Noise Aggregator off: a pure function of
        (seed, step, index), so any rank count and any resume make the same choice."""
        if self.noise_drop_prob <= 0:
            return False
        g = torch.Generator().manual_seed((self.seed * 1000003 + step) * 1009 + micro_index)
        return bool(torch.rand((), generator=g).item() < self.noise_drop_prob)

    # ----- resume -----------------------------------------------------------
    def maybe_resume(self) -> bool:
        path = ckpt.verified_checkpoint(self.ckpt_root, self.rank, self.world, log)
        if path is None:
            return False
        self._check_resumable(path, ckpt.read_trainer_state(path))
        t0 = time.perf_counter()
        state = ckpt.load_checkpoint(self.engine, path, self.rank)
        if self.rank == 0:
            log.info("%s: checkpoint %s verified in %.2f s, loaded in %.2f s", self.name, path.name,
                     ckpt.LAST_TIMINGS.get("verify_s", 0.0), time.perf_counter() - t0)
        self._apply_peak_lr(path)
        self.start_step = state["step"]
        self.result = StageResult.from_state(state["result"])
        self.result.resumed_from = str(path)
        if self.rank == 0:
            log.info("%s: resumed from %s (step %d of %d)", self.name, path, self.start_step, self.total_steps)
        return True

    def _check_resumable(self, path, state: dict):
        """Refuse, before DeepSpeed reads a byte of it, a checkpoint this run cannot continue exactly."""
        if state.get("world_size", self.world) != self.world:
            raise ckpt.CheckpointError(
                f"{path}: written by {state['world_size']} ranks, and this run has {self.world}. ZeRO partitions "
                f"the optimizer state per rank: resume with {state['world_size']} ranks, or start the stage over "
                f"by deleting {path.parent}")
        theirs = state.get("signature", {})
        diffs = [f"{k}: {theirs[k]!r} in the checkpoint, {v!r} now" for k, v in self.resume_signature.items()
                 if k in theirs and theirs[k] != v]
        if diffs:
            raise ckpt.CheckpointError(
                f"{path}: this checkpoint was written under other settings (" + "; ".join(diffs) + "). Restore "
                f"them to resume, or start the stage over by deleting {path.parent} (or with a new output_dir)")

    def _apply_peak_lr(self, path):
        """A rerun may change the stage's lr (say, after a stop for non-finite steps): the loaded
        scheduler keeps the old peak, so put the recipe's in and re-derive the current lr from it."""
        old = list(self.scheduler.base_lrs)
        if all(lr == self.cfg.lr for lr in old):
            return
        self.scheduler.base_lrs = [self.cfg.lr] * len(old)
        lrs = [base * f(self.scheduler.last_epoch) for base, f in zip(self.scheduler.base_lrs,
                                                                     self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        if self.rank == 0:
            log.warning("%s: resuming %s with peak lr %g instead of the checkpoint's %g", self.name, path.name,
                        self.cfg.lr, old[0])

    def _save(self, step: int):
        state = {"stage": self.name, "step": step, "total_steps": self.total_steps, "world_size": self.world,
                 "signature": self.resume_signature, "result": self.result.to_state()}
        ckpt.save_checkpoint(self.engine, self.ckpt_root, step, state, self.rank, self.world,
                             self.logging_cfg.keep_last)
        t = ckpt.LAST_TIMINGS
        if self.rank == 0:
            log.info("%s: checkpoint step %d: %.1f MB, written in %.2f s, digested and fsynced in %.2f s", self.name,
                     step, t["bytes"] / 1e6, t["write_s"], t["digest_fsync_s"])

    # ----- the loop ---------------------------------------------------------
    def train(self) -> StageResult:
        from tqdm import tqdm

        engine, res = self.engine, self.result
        penalty_scale = 1.0 / self.grad_accum
        set_penalty_grad_scale(self.model, penalty_scale)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.name, dynamic_ncols=True,
                   disable=self.rank != 0 or not self.logging_cfg.progress_bar)
        engine.train()
        preemption.install()  # SIGUSR1/SIGTERM -> checkpoint at the next optimizer step, exit 75
        t_stage = time.perf_counter()
        window_tokens, window_flops, window_t = 0, 0.0, time.perf_counter()
        for step in range(self.start_step, self.total_steps):
            batches, local_tokens, local_flops = self._micro_batches(step)
            counts = all_reduce_sum(torch.tensor([float(local_tokens), 0.0], device=self.device))
            n_global = max(1.0, counts[0].item())
            loss_sum = torch.zeros((), device=self.device)
            step_tokens = 0
            injected = injected_nonfinite(self.name, step + 1, self.rank)
            for batch in batches:
                set_noise_aggregator_off(self.model, batch.pop("noise_off"))
                batch = {k: v.to(self.device) for k, v in batch.items()}
                micro_loss = self._loss_sum(batch)
                if injected:
                    micro_loss = poison(micro_loss, injected)
                # A non-finite loss must leave a non-finite gradient (an infinite loss can have a finite one):
                # DeepSpeed then discards the update on every rank, because it checks the all-reduced
                # gradient norm (in every dtype; tests/test_faults.py holds it to that).
                guard = torch.where(torch.isfinite(micro_loss.detach()), 1.0, float("nan"))
                # DeepSpeed divides by grad_accum and averages over ranks; undo both so the
                # gradient is that of the token mean over the whole global batch.
                engine.backward(micro_loss * guard * (self.world * self.grad_accum / n_global))
                engine.step()
                loss_sum += micro_loss.detach()
                step_tokens += int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())
            # One all-reduce for the step's loss, tokens, flops and two flags: preemption (all ranks agree on
            # stopping) and a discarded update (all ranks must agree, or their adapters now differ).
            local = [loss_sum, step_tokens, preemption.local_flag(), local_flops, not engine.was_step_applied()]
            totals = all_reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device)
                                                 for v in local]))
            preempted = totals[2].item() > 0 and step + 1 < self.total_steps
            loss = totals[0].item() / n_global
            skipped = self._check_skipped(step + 1, loss, int(totals[4].item()))
            tokens = int(totals[1].item())
            res.tokens += tokens
            res.model_flops += totals[3].item()
            window_tokens += tokens
            window_flops += totals[3].item()
            lr = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            res.steps = step + 1
            if not skipped:
                res.losses.append((step + 1, loss))
                res.lrs.append((step + 1, lr))
                res.grad_norms.append((step + 1, grad_norm))
            self._accumulate_expert_counts()
            log_now = not skipped and ((step + 1) % self.logging_cfg.log_every == 0 or step + 1 == self.total_steps)
            if self.measure_orthogonality and (log_now or step + 1 == self.total_steps):
                res.residuals.append((step + 1, orthogonality_residual(self.model)))
            if log_now:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                tflops = window_flops / max(now - window_t, 1e-9) / 1e12
                window_tokens, window_flops, window_t = 0, 0.0, now
                self._log(step + 1, loss, lr, grad_norm, tps, tflops)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if self._eval_due(step + 1) and self._validate(step + 1, bar):
                break  # early stopping: every rank saw the same validation losses
            periodic = self.cfg.save_every and (step + 1) % self.cfg.save_every == 0
            streak = self._nonfinite_streak()
            stop = streak > self.max_nonfinite_steps  # saves even at the last step: the run ends in an error
            if ((periodic or preempted) and step + 1 < self.total_steps) or stop:
                res.seconds += time.perf_counter() - t_stage
                t_stage = time.perf_counter()
                self._save(step + 1)
            if stop:
                bar.close()
                self._stop_after_nonfinite(step + 1, streak)
            if preempted:
                bar.close()
                preemption.exit_for_requeue(f"{self.name}: checkpoint at step {step + 1} after a preemption signal")
            injected_failure(self.name, step + 1, self.rank)
            if self.device.type == "cpu":
                # Between steps nothing is live but the static state: hand the freed activations' and gathered
                # weights' pages back, or fragmentation grows the resident set step after step (measured at
                # 0.5B on 2 ranks: 3.7 GiB at step 1, 5.7 GiB by step 2).
                release_free_heap()
        bar.close()
        set_noise_aggregator_off(self.model, False)
        res.seconds += time.perf_counter() - t_stage
        return res

    def _loss_sum(self, batch: dict, count_correct: bool = False):
        """Summed token loss of one micro-batch through the engine (the training step's and validation's);
        with count_correct, (loss, correctly predicted tokens)."""
        # Packed batches (medcare_dist.training.packing) carry position_ids and no attention_mask.
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if self.head is not None:
            with self.head.loss_for(batch["labels"], count_correct):
                loss = lm_loss_from_output(self.engine(**inputs))  # the lm_head returns the summed loss
            return (loss, self.head.last_num_correct) if count_correct else loss
        logits = self.engine(**inputs).logits
        loss = token_loss_sum(logits, batch["labels"])
        return (loss, token_correct(logits, batch["labels"])) if count_correct else loss

    # ----- validation -------------------------------------------------------
    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(self.eval_dataset is not None and every and (step % every == 0 or step == self.total_steps))

    @torch.no_grad()
    def _validation_metrics(self) -> tuple[float, float]:
        """(mean token loss, token accuracy) over the validation rows: each rank takes a contiguous share,
        every rank runs the same number of forwards (ZeRO-3 gathers parameters inside them), the sums are
        all-reduced."""
        n = len(self.eval_dataset)
        per_rank = -(-n // self.world)
        mine = list(range(self.rank * per_rank, min(n, (self.rank + 1) * per_rank)))
        self.engine.eval()
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for b in range(-(-per_rank // self.micro)):
            rows = mine[b * self.micro:(b + 1) * self.micro]
            batch = self.collate([self.eval_dataset[i] for i in (rows or [0])])  # a share may run out: a dummy
            batch = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
            loss, right = self._loss_sum(batch, count_correct=True)
            if rows:
                loss_sum += loss.detach().float()
                tokens += (batch["labels"][:, 1:] != -100).sum()
                correct += right.float().to(self.device)
        self.engine.train()
        totals = all_reduce_sum(torch.stack([loss_sum, tokens.float(), correct]))
        n = max(1.0, totals[1].item())
        return totals[0].item() / n, totals[2].item() / n

    def _validate(self, step: int, bar) -> bool:
        """Evaluate, keep the best (save_best), log; True when early stopping ends the stage here."""
        from medcare_dist.method import adapter_io
        from medcare_dist.training import integrity

        res = self.result
        val, accuracy = self._validation_metrics()
        res.val_losses.append((step, val))
        res.val_accuracies.append((step, accuracy))
        if res.best_val_loss is None or val < res.best_val_loss:
            res.best_val_loss, res.best_step, res.evals_since_best = val, step, 0
            if self.cfg.save_best:
                tmp, best = self.out_dir / ".best_adapters.tmp", self.out_dir / "best_adapters"
                adapter_io.save_adapters(self.model, tmp, extra={"stage": self.name, "step": step,
                                                                 "val_loss": val}, is_writer=self.rank == 0)
                if self.rank == 0:
                    integrity.publish_dir(tmp, best)
        else:
            res.evals_since_best += 1
        if self.rank == 0:
            log.info("%s step %d/%d val_loss %.4f token_accuracy %.4f (best loss %.4f at step %d)", self.name, step,
                     self.total_steps, val, accuracy, res.best_val_loss, res.best_step)
            if self.trackers is not None:
                self.trackers.add_scalar(f"{self.name}/val_loss", val, step)
                self.trackers.add_scalar(f"{self.name}/val_token_accuracy", accuracy, step)
            bar.set_postfix(val_loss=f"{val:.4f}", acc=f"{accuracy:.3f}", best=f"{res.best_val_loss:.4f}")
        patience = self.cfg.early_stopping_patience
        if patience and res.evals_since_best >= patience and step < self.total_steps:
            res.stopped_early_at = step
            if self.rank == 0:
                log.info("%s: early stopping at step %d: no better validation loss in %d evaluations (best %.4f at "
                         "step %d)", self.name, step, patience, res.best_val_loss, res.best_step)
            return True
        return False

    # ----- numerical faults ---------------------------------------------------
    def _check_skipped(self, step: int, loss: float, ranks_skipped: int) -> bool:
        """Whether DeepSpeed discarded this step's update; raises if the ranks disagree or a bad step got through."""
        if ranks_skipped not in (0, self.world):
            raise RuntimeError(f"{self.name} step {step}: {ranks_skipped} of {self.world} ranks discarded the "
                               "optimizer update and the others applied it; their adapters now differ")
        if ranks_skipped == 0:
            if not math.isfinite(loss):
                raise RuntimeError(f"{self.name} step {step}: the loss is {loss} but DeepSpeed applied the update "
                                   "(this DeepSpeed version no longer skips non-finite gradients)")
            return False
        if not math.isfinite(loss):
            reason = "non-finite loss"
        elif self.fp16:
            reason = "fp16 overflow"  # dynamic loss scaling: DeepSpeed lowers the scale and retries
        else:
            reason = "non-finite gradient"
        self.result.skipped_steps.append((step, reason))
        if self.rank == 0:
            log.warning("%s step %d/%d: %s (loss %s); the update is discarded on every rank", self.name, step,
                        self.total_steps, reason, loss)
        if self.trackers is not None:
            self.trackers.add_scalar(f"{self.name}/skipped_steps", len(self.result.skipped_steps), step)
        return True

    def _nonfinite_streak(self) -> int:
        """Skipped steps (fp16 overflows aside) in a row, ending at the latest step."""
        streak, expected = 0, self.result.steps
        for step, reason in reversed(self.result.skipped_steps):
            if step != expected or reason == "fp16 overflow":
                break
            streak, expected = streak + 1, step - 1
        return streak

    def _stop_after_nonfinite(self, step: int, streak: int):
        raise NonFiniteStepsError(
            f"{self.name}: {streak} optimizer steps in a row ({step - streak + 1}..{step}) had a non-finite loss "
            f"or gradient, more than fault_tolerance.max_nonfinite_steps={self.max_nonfinite_steps}; none of them "
            f"changed the adapters. Saved {self.ckpt_root / f'step-{step:07d}'}. Check the data of those steps or "
            f"lower {self.name}.lr (a resume takes the new peak lr), then rerun the command to resume from it.")

    def _accumulate_expert_counts(self):
        counts = pop_expert_counts(self.model)
        if not counts:
            return
        names = sorted(counts)
        flat = all_reduce_sum(torch.stack([counts[n].float() for n in names]).to(self.device)).cpu()
        for n, row in zip(names, flat):
            prev = self.result.expert_counts.get(n)
            self.result.expert_counts[n] = [a + b for a, b in zip(prev, row.tolist())] if prev else row.tolist()

    def _log(self, step, loss, lr, grad_norm, tokens_per_s, tflops=None):
        if self.rank != 0:
            return
        penalty = last_penalty_total(self.model)
        extra = f" penalty {penalty:.4g}" if penalty else ""
        mfu = tflops / (self.peak_tflops * self.world) if (tflops is not None and self.peak_tflops) else None
        if tflops is not None:
            extra += f" model_TFLOP/s {tflops:.3g}" + (f" mfu {mfu:.3f}" if mfu is not None else "")
        if self.result.residuals and self.result.residuals[-1][0] == step:
            extra += f" ortho_residual {self.result.residuals[-1][1]:.2e}"
        log.info("%s step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f%s", self.name, step,
                 self.total_steps, loss, lr, grad_norm, tokens_per_s, extra)
        if self.trackers is None:
            return
        tag = self.name
        self.trackers.add_scalar(f"{tag}/loss", loss, step)
        self.trackers.add_scalar(f"{tag}/lr", lr, step)
        self.trackers.add_scalar(f"{tag}/grad_norm", grad_norm, step)
        self.trackers.add_scalar(f"{tag}/tokens_per_s", tokens_per_s, step)
        if tflops is not None:
            self.trackers.add_scalar(f"{tag}/model_tflops_per_s", tflops, step)
        if mfu is not None:
            self.trackers.add_scalar(f"{tag}/mfu", mfu, step)
        if penalty:
            self.trackers.add_scalar(f"{tag}/penalty", penalty, step)
        if self.result.residuals and self.result.residuals[-1][0] == step:
            self.trackers.add_scalar(f"{tag}/orthogonality_residual", self.result.residuals[-1][1], step)
        if self.result.expert_counts:
            # One image (layers x experts, each row the share of tokens routed to each expert) and one
            # imbalance scalar per layer, all in this run's event file: add_scalars would write one run
            # folder per layer x expert (about 960 for Qwen1.5-14B).
            names = sorted(self.result.expert_counts)
            shares = torch.tensor([self.result.expert_counts[n] for n in names], dtype=torch.float32)
            shares = shares / shares.sum(dim=1, keepdim=True).clamp_min(1.0)
            self.trackers.add_image(f"{tag}/expert_utilisation", (shares / shares.max().clamp_min(1e-9))[None], step)
            for name, row in zip(names, shares):
                self.trackers.add_scalar(f"{tag}/expert_imbalance/{name}", float(row.max() * row.numel()), step)
