"""The whole MedCare job: stage 1 -> TAIA merge -> stage 2 -> final merged model -> report.

Each step writes its output under `output_dir` and marks it complete last, so
rerunning the same command skips finished steps and resumes the running
stage from its newest complete checkpoint:
  demo_assets/   (embedded default only) tokenizer, tiny base model, data
  stage1/        adapters/ (attention LoRA + mixture-of-LoRA), checkpoints/, tokenized/, result.json
  merged_base/   HF model with the attention LoRA folded in; knowledge_adapters/ (KA)
  stage2/        adapters/ (KA + alignment LoRA), checkpoints/, tokenized/, result.json
  final/         plain HF model (safetensors) with every adapter folded in
  report.json, report.md, *.png, tensorboard/, train.log, host_memory.json (every rank's memory per phase)
"""

import gc
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from medcare_dist.method import adapter_io
from medcare_dist.config import STEPS, resolve_dtype
from medcare_dist.training.ds_config import build_ds_config
from medcare_dist.training.distributed import (all_gather_object, all_reduce_sum, barrier, broadcast_object,
                                              init_distributed)
from medcare_dist.errors import InputError
from medcare_dist.training.faults import injected_failure
from medcare_dist.method.injection import add_stage1_adapters, add_stage2_adapters, merge_all, merge_attention_lora, remove_adapters
from medcare_dist.training.loss import install_chunked_lm_head
from medcare_dist.training.modeling import (device_type, enable_gradient_checkpointing, load_base_model,
                                            use_fused_gated_mlp)
from medcare_dist.training.packing import collate_packed, supports_packing
from medcare_dist.method.orthogonal import orthogonality_residual
from medcare_dist.training.trainer import StageTrainer
from medcare_dist.training import host_memory, integrity
from medcare_dist.training.host_memory import GiB, PhaseMemory, engine_tensor_bytes
from medcare_dist.training.run_lock import RunLock
from medcare_dist.training.zero import fit_reduce_bucket, mark_adapter_leaf_modules, release_engine

log = logging.getLogger("medcare_dist")

KNOWLEDGE_INPUT_ROWS = 512  # stage-1 rows whose layer inputs define the protected subspace

STEP_OUTPUTS = {"stage1": ("stage1/result.json", "stage1/adapters", "stage1/checkpoints", "stage1/best_adapters"),
                "merge": ("merged_base",), "stage2": ("stage2/result.json", "stage2/adapters", "stage2/checkpoints",
                                                      "stage2/best_adapters", "stage2/knowledge_inputs.safetensors"),
                "final": ("final",)}


class PipelineError(InputError):
    pass


def setup_logging(rank: int, log_file: Path | None):
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("medcare_dist")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    root.addHandler(h)
    if log_file is not None and rank == 0:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def _model_fingerprint(path: Path) -> dict:
    """What identifies a base model directory cheaply: config.json's bytes and its weight files' names and
    sizes (hashing 28 GB of a 14B model at every start would cost minutes), or, for a directory this project
    published (the embedded demo base, merged_base), the digest of its manifest."""
    import hashlib

    path = Path(path)
    if (path / integrity.MANIFEST_NAME).is_file():
        return {"manifest_sha256": integrity.file_sha256(path / integrity.MANIFEST_NAME)}
    weights = sorted((p.name, p.stat().st_size) for p in path.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    return {"config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
            "weights": [f"{n}:{size}" for n, size in weights]}


def _dir_digest(path: Path) -> str | None:
    """The digest of a published directory's manifest (it lists every file's sha256), None if unpublished."""
    manifest = Path(path) / integrity.MANIFEST_NAME
    return integrity.file_sha256(manifest) if manifest.is_file() else None


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(not set)')!r} then, {new.get(k, '(not set)')!r} now"
            for k in keys if old.get(k) != new.get(k)]


class Pipeline:
    def __init__(self, cfg):
        self.lock = None
        try:
            self._start(cfg)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _start(self, cfg):
        from medcare_dist.config import check_data_sources

        check_data_sources(cfg)  # before anything is written: a stage without data is a recipe error
        self.cfg = cfg
        self.rank, self.world = init_distributed(cfg.fault_tolerance.collective_timeout_s)
        # What a rank holds before any model or data: the interpreter, torch, transformers, DeepSpeed, the process group.
        self.memory = PhaseMemory()
        self.runtime_bytes = host_memory.status().get("rss", 0)
        self.out = Path(cfg.output_dir)
        self._prepare_output_dir()
        setup_logging(self.rank, self.out / "train.log")
        if getattr(self, "_leftovers", None):
            log.info("removed %d half-written leftovers of an earlier attempt: %s", len(self._leftovers),
                     ", ".join(self._leftovers[:5]))
        self.dtype = resolve_dtype(cfg.model.dtype, device_type())
        self.steps = STEPS[str(cfg.stage)]
        self.trackers = None
        from medcare_dist.training.trackers import check_installed

        check_installed(cfg.logging.report_to)
        self.results: dict[str, dict] = {}
        self._stage1_rows_cache = None
        self._data: dict[str, tuple] = {}

    def _prepare_output_dir(self):
        """Rank 0 checks and creates output_dir; then every rank must see what rank 0 writes there.

        Every rank writes its checkpoint shards into one directory that rank 0 publishes, so output_dir
        on node-local disks would train for hours and fail at the first resume. Outcomes are broadcast
        so that every rank stops with the same message rather than on a broken connection.
        """
        outcome = None
        if self.rank == 0:
            try:
                self._check_output_dir()
                self.out.mkdir(parents=True, exist_ok=True)
                self.lock = RunLock(self.out).acquire()  # held until the run ends (cli.main releases it)
                self._remove_leftover_tmp()
                token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
                (self.out / f".probe-{token}").write_text(token)  # a new name: no stale NFS lookup can match it
                outcome = ("ok", token)
            except (InputError, OSError) as e:
                outcome = ("error", f"output_dir {self.out}: {e}" if isinstance(e, OSError) else str(e))
        status, token = broadcast_object(outcome)
        if status == "error":
            raise PipelineError(token)
        probe = self.out / f".probe-{token}"
        deadline = time.monotonic() + 10  # network file systems may show a new file a moment late
        while not (sees := probe.is_file() and probe.read_text() == token) and time.monotonic() < deadline:
            time.sleep(0.5)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        blind = int(all_reduce_sum(torch.tensor([0.0 if sees else 1.0], device=device)).item())
        if self.rank == 0:
            probe.unlink(missing_ok=True)
        if blind:
            raise PipelineError(
                f"output_dir {self.out}: {blind} of {self.world} ranks cannot see the files rank 0 writes there "
                f"(rank {self.rank} on {socket.gethostname()}: {'sees them' if sees else 'does not'}). Every rank "
                "writes its checkpoint shards into it: put output_dir on a file system all nodes share "
                "(NFS, Lustre, GPFS, ...), by an absolute path that is the same on every node")

    def _remove_leftover_tmp(self):
        """Half-written directories and files of a run that died (never published, never read)."""
        leftovers = [p for pattern in (".tmp-*", ".*.tmp") for p in self.out.rglob(pattern)]
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self._leftovers = [str(p.relative_to(self.out)) for p in leftovers]

    def _check_output_dir(self):
        if self.cfg.resume or not self.out.exists() or not any(self.out.iterdir()):
            return
        raise PipelineError(f"output_dir {self.out} already holds a run and resume=false: choose another "
                            "output_dir, delete it, or set resume=true to continue it")

    # ----- inputs -----------------------------------------------------------
    def _prepare_inputs(self):
        """Base model path, tokenizer and per-stage data sources (building the demo assets once)."""
        from medcare_dist.config import check_data_sources

        cfg = self.cfg
        for warning in check_data_sources(cfg):
            if self.rank == 0:
                log.warning("%s", warning)
        sources = {"stage1": [s.__dict__ for s in cfg.data.stage1], "stage2": [s.__dict__ for s in cfg.data.stage2]}
        base_path = Path(cfg.model.path) if cfg.model.path else None
        wanted = [s for s in ("stage1", "stage2") if s in self.steps]
        if "stage2" in self.steps and self._stage2_reads_stage1_rows() and "stage1" not in wanted:
            wanted.insert(0, "stage1")  # stage 2 replays stage-1 rows, or measures the knowledge inputs on them
        # The demo data only where the recipe asks for it (config checks: an empty list needs data.demo=true).
        needs_demo = base_path is None or (cfg.data.demo and any(not sources[s] for s in wanted))
        if needs_demo:
            from medcare_dist.demo.assets import prepare_demo

            demo_dir = self.out / "demo_assets"
            if self.rank == 0:
                assets = prepare_demo(demo_dir, seed=cfg.data.demo_seed)
                if base_path is None and not (demo_dir / "base_model" / "config.json").is_file():
                    from medcare_dist.demo.base_model import build_demo_base

                    tmp = demo_dir / ".base_model.tmp"
                    shutil.rmtree(tmp, ignore_errors=True)
                    build_demo_base(tmp, assets.tokenizer(), cfg.model.tiny, cfg.seed)
                    tiny = {k: v for k, v in vars(cfg.model.tiny).items()}
                    integrity.publish_dir(tmp, demo_dir / "base_model", inputs={"tiny": tiny, "seed": cfg.seed})
            barrier()
            assets = prepare_demo(demo_dir, seed=cfg.data.demo_seed)  # already built: only reads
            if base_path is None:
                base_path = demo_dir / "base_model"
                integrity.verify_dir_on_all_ranks(base_path, "the embedded demo base model: delete "
                                                  f"{base_path} to rebuild it", self.rank, self.world)
                self._check_demo_base(base_path)
            for stage in wanted:
                if not sources[stage]:
                    sources[stage] = [{"path": str(assets.files[f"{stage}_train"]), "format": "messages",
                                       "max_samples": None}]
            self.demo_assets = assets
        else:
            self.demo_assets = None
        if not (base_path / "config.json").is_file():
            raise PipelineError(f"model.path={base_path}: no config.json there (a local Hugging Face model "
                                "directory is expected; nothing is downloaded)")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path), local_files_only=True,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base_path = base_path
        self.sources = sources

    def _check_demo_base(self, base_path: Path):
        """The embedded base a rerun finds must be the one this recipe's model.tiny and seed build."""
        built = integrity.manifest_inputs(base_path)
        wanted = {"tiny": dict(vars(self.cfg.model.tiny)), "seed": self.cfg.seed}
        diffs = _differences(built, wanted)
        if diffs:
            raise PipelineError(f"{base_path}: the embedded demo base there was built with other settings ("
                                + "; ".join(diffs) + "); use another output_dir, or delete "
                                f"{self.out} to start over (stage 1 trains on that base)")

    def _check_adapters_fit(self):
        """Adapter targets and ranks against the base model's shapes, on a meta-device copy: no weights read."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from medcare_dist.config import ConfigError
        from medcare_dist.method.injection import check_adapter_fit, describe_targets, resolved_targets

        trust = self.cfg.model.trust_remote_code
        config = AutoConfig.from_pretrained(str(self.base_path), local_files_only=True, trust_remote_code=trust)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        problems, warnings = check_adapter_fit(skeleton, self.cfg.adapters)
        if self.rank == 0:
            for w in warnings:
                log.warning("%s", w)
        if problems:
            raise ConfigError(f"the adapters do not fit {self.base_path} ({config.model_type}):\n  "
                              + "\n  ".join(problems))
        if self.rank == 0:
            log.info("adapter targets: %s", describe_targets(resolved_targets(skeleton, self.cfg.adapters)))
        torch.manual_seed(0)
        with torch.device("meta"):
            add_stage1_adapters(skeleton, self.cfg.adapters)
        trainable = [p.numel() for p in skeleton.parameters() if p.requires_grad]
        return sum(trainable), max(trainable, default=0)

    def _preflight(self):
        """Everything that can be checked without training, before any step runs: the adapters against the
        model's shapes, both stages' DeepSpeed configs and batch arithmetic, both stages' data (read,
        validated, tokenized into the cache), init_from's base, and the disk space of the first checkpoint."""
        cfg = self.cfg
        trainable, largest = self._check_adapters_fit()
        if "stage2" in self.steps and "stage1" not in self.steps:
            self._check_same_base(self._merged_base())
        stages = [s for s in ("stage1", "stage2") if s in self.steps]
        for stage in stages:
            zero = build_ds_config(cfg, getattr(cfg, stage), self.world, self.dtype).get("zero_optimization", {})
            if self.rank != 0:
                continue
            log.info("%s: DeepSpeed zero_optimization (%s, \"auto\" filled in): %s", stage, cfg.deepspeed.config,
                     json.dumps(zero, sort_keys=True))
            threshold = zero.get("stage3_param_persistence_threshold", 100000)
            if zero.get("stage") == 3 and isinstance(threshold, (int, float)) and threshold < largest:
                log.warning("%s: zero_optimization.stage3_param_persistence_threshold=%s in %s partitions adapter "
                            "tensors (the largest has %d elements): every forward and backward then all-gathers "
                            "them; ds_configs/zero3.json keeps them whole (2000000)", stage, threshold,
                            cfg.deepspeed.config, largest)
        for stage in stages:
            dataset = self._dataset(stage)[0]
            glob = getattr(cfg, stage).global_batch_size
            if len(dataset) < glob:
                from medcare_dist.data.conversations import DataError

                raise DataError(f"data.{stage}: {len(dataset)} training samples are fewer than one global batch "
                                f"({stage}.global_batch_size={glob}); lower it or add data")
        self._check_disk_space(trainable)

    def _check_disk_space(self, trainable: int):
        """Refuse a run whose first checkpoint cannot fit on output_dir's file system; warn when the whole
        run (keep_last checkpoints, merged_base, final) may not."""
        problem = self._disk_space_problem(trainable) if self.rank == 0 else None
        problem = broadcast_object(problem)
        if problem:
            raise PipelineError(problem)

    def _disk_space_problem(self, trainable: int) -> str | None:
        from medcare_dist.training.checkpoint import checkpoint_bytes

        first = checkpoint_bytes(trainable, self.dtype, self.world)
        model_bytes = sum(p.stat().st_size for p in Path(self.base_path).iterdir()
                          if p.suffix in (".safetensors", ".bin") and p.is_file())
        whole = first * (self.cfg.logging.keep_last + 1) + model_bytes * sum(s in self.steps for s in ("merge", "final"))
        free = shutil.disk_usage(self.out).free
        if free < first:
            return (f"output_dir {self.out}: {free / 1e9:.2f} GB free, and the first checkpoint needs "
                    f"about {first / 1e9:.2f} GB ({trainable / 1e6:.1f}M trainable parameters); free space "
                    "or choose another output_dir")
        if free < whole:
            log.warning("output_dir %s: %.2f GB free; the whole run may need about %.2f GB (%d checkpoints kept, "
                        "merged_base and final of %.2f GB each)", self.out, free / 1e9, whole / 1e9,
                        self.cfg.logging.keep_last, model_bytes / 1e9)
        return None

    def _tokenized(self, sources, root: Path, label: str):
        """(dataset, stats, key) of `sources` tokenized into the cache under `root`.

        Every rank tokenizes a slice into the cache (or finds it built by an earlier attempt), then
        memory-maps the whole. Bad data raises the same DataError on every rank, before any barrier.
        """
        from medcare_dist.data import token_cache
        from medcare_dist.data.conversations import check_usable

        args = (sources, self.tokenizer, self.cfg.data.max_length, self.cfg.data.on_bad_row, self.cfg.seed)
        key = token_cache.cache_key(*args)
        built = not token_cache.is_built(root, key)  # the same on every rank: nothing is published before
        if built:                                    # the barrier below
            token_cache.build_slice(root, key, *args, rank=self.rank, world=self.world)
            barrier()
            if self.rank == 0:
                token_cache.publish(root, key, self.world)
            barrier()
        check_usable(token_cache.read_stats(root, key), sources)
        dataset, stats = token_cache.load(root, key, self.rank, self.world)
        if self.rank == 0:
            log.info("%s (%s %s): %s", label, "tokenized into" if built else "reused", root / key,
                     json.dumps(stats.to_dict()))
        return dataset, stats, key

    def _dataset(self, stage: str):
        """(dataset, stats, collate, key) of a stage, tokenized on the first call (the pre-flight checks)."""
        if stage not in self._data:
            self._data[stage] = self._build_dataset(stage)
        return self._data[stage]

    def _build_dataset(self, stage: str):
        from medcare_dist.data.conversations import collate

        dataset, stats, key = self._tokenized(self.sources[stage], self.out / stage / "tokenized", f"{stage} data")
        dataset, eval_set, key = self._validation_split(stage, dataset, key)
        if stage == "stage2" and self.cfg.data.stage2_replay > 0:
            dataset, key = self._with_replay(dataset, key)
        pad_id, max_length = self.tokenizer.pad_token_id, self.cfg.data.max_length
        if self.cfg.data.packing:
            # Each micro-batch's samples packed into rows of <= max_length (position_ids restart per sample,
            # no attention_mask): the same samples and loss tokens, a fraction of the padding.
            fn = lambda batch: collate_packed(batch, pad_id, max_length, pad_to_multiple_of=8)  # noqa: E731
        else:
            fn = lambda batch: collate(batch, pad_id)  # noqa: E731
        return dataset, stats, fn, key, eval_set

    def _validation_split(self, stage: str, dataset, key: str):
        """(training rows, validation rows or None, key): the stage's eval files, tokenized like its data, or
        data.val_size of its rows held out (a seeded choice, fixed for the run); None without eval_every."""
        cfg = self.cfg
        if not getattr(cfg, stage).eval_every:
            return dataset, None, key
        files = [s.__dict__ for s in getattr(cfg.data, f"{stage}_eval")]
        if files:
            eval_set, _, eval_key = self._tokenized(files, self.out / stage / "tokenized_eval", f"{stage} eval data")
            return dataset, eval_set, f"{key}+eval:{eval_key}"
        v = cfg.data.val_size
        n_val = int(v) if v >= 1 else round(v * len(dataset))
        if not 1 <= n_val < len(dataset):
            from medcare_dist.data.conversations import DataError

            raise DataError(f"data.val_size={v}: holds out {n_val} of the {len(dataset)} rows of data.{stage}; "
                            "it must leave at least one row on each side")
        g = torch.Generator().manual_seed(cfg.seed * 7919 + (5 if stage == "stage1" else 7))
        perm = torch.randperm(len(dataset), generator=g).tolist()
        held, kept = sorted(perm[:n_val]), sorted(perm[n_val:])
        if self.rank == 0:
            log.info("%s: %d rows held out for validation (data.val_size=%g), %d left for training", stage, n_val,
                     v, len(kept))
        return dataset.select(kept), dataset.select(held), f"{key}+val:{v}"

    def _with_replay(self, dataset, key: str):
        """Stage-2 rows plus round(stage2_replay x their number) stage-1 rows (a seeded subset, fixed for
        the run), so stage 2 keeps rehearsing what stage 1 taught."""
        import datasets

        ratio = self.cfg.data.stage2_replay
        replay, _, replay_key = self._stage1_rows()
        n = min(len(replay), round(ratio * len(dataset)))
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + 2)
        picked = sorted(torch.randperm(len(replay), generator=g)[:n].tolist())
        mixed = datasets.concatenate_datasets([dataset, replay.select(picked)])
        if self.rank == 0:
            log.info("stage2: %d stage-2 rows + %d replayed stage-1 rows (data.stage2_replay=%g; %d available)",
                     len(dataset), n, ratio, len(replay))
        return mixed, f"{key}+replay:{replay_key}:{ratio}"

    def _stage2_reads_stage1_rows(self) -> bool:
        return self.cfg.data.stage2_replay > 0 or self.cfg.adapters.protect_inputs_energy > 0

    def _stage1_rows(self):
        """Stage 1's rows tokenized for stage 2 (replay, knowledge inputs): (dataset, stats, key); collective
        on the first call."""
        if self._stage1_rows_cache is None:
            self._stage1_rows_cache = self._tokenized(self.sources["stage1"], self.out / "stage2" / "stage1_rows",
                                                      "stage-1 rows for stage 2 (replay, knowledge inputs)")
        return self._stage1_rows_cache

    def _knowledge_input_bases(self, merged: Path) -> dict:
        """Per layer, the principal directions of the knowledge data's inputs to the TAIA model (rank 0 computes
        them on a plain copy of merged_base + KA, every rank loads them): adapters.protect_inputs_energy."""
        from safetensors.torch import load_file, save_file

        from medcare_dist.data.conversations import collate
        from medcare_dist.method.input_subspace import knowledge_input_bases

        a = self.cfg.adapters
        rows, _, key = self._stage1_rows()
        path = self.out / "stage2" / "knowledge_inputs.safetensors"
        meta = {"energy": str(a.protect_inputs_energy), "stage1_rows": key, "align_rank": str(a.align_rank),
                "merged_base": str(merged.resolve())}
        if self.rank == 0:
            from safetensors import safe_open

            current = False
            if path.is_file():
                with safe_open(str(path), "pt") as f:
                    current = f.metadata() == meta
            if not current:
                model = load_base_model(merged, self.dtype, "sdpa", None, self.cfg.model.trust_remote_code)
                adapter_io.load_adapters(model, merged / "knowledge_adapters")
                model.eval()
                n = min(len(rows), KNOWLEDGE_INPUT_ROWS)
                g = torch.Generator().manual_seed(self.cfg.seed * 7919 + 3)
                picked = torch.randperm(len(rows), generator=g)[:n].tolist()
                pad = self.tokenizer.pad_token_id
                batches = ({k: v for k, v in collate([rows[i] for i in picked[j:j + 16]], pad).items()
                            if k in ("input_ids", "attention_mask")} for j in range(0, n, 16))
                bases = knowledge_input_bases(model, batches, a.protect_inputs_energy, a.align_rank)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                save_file({k: v.contiguous() for k, v in bases.items()}, str(tmp), metadata=meta)
                os.replace(tmp, path)
                ranks = sorted({v.shape[1] for v in bases.values()})
                log.info("stage2: knowledge-input directions protected per layer: %s (energy %g, %d stage-1 rows)",
                         ranks, a.protect_inputs_energy, n)
                del model
        barrier()
        return load_file(str(path))

    def _resume_signature(self, stage: str, stage_cfg, data_key: str) -> dict:
        """The settings a checkpoint of this stage can only be resumed under, by dotted recipe name.

        Left out, so a rerun may change them: the peak lr (applied from the resume on), max_grad_norm
        (read from the DeepSpeed config each run), micro_batch_size (the global batch of a step does not
        depend on how it is split), and the logging / checkpointing / fault-tolerance knobs.
        """
        from dataclasses import asdict

        sig = {"seed": self.cfg.seed, "model.dtype": self.dtype, f"data.{stage} (the tokenized rows)": data_key}
        sig.update({f"adapters.{k}": v for k, v in asdict(self.cfg.adapters).items()})
        sig.update({f"{stage}.{k}": v for k, v in asdict(stage_cfg).items()
                    if k not in ("lr", "max_grad_norm", "micro_batch_size", "save_every")})
        return sig

    # ----- what each step is made from ------------------------------------------------
    def _step_settings(self, step: str) -> dict:
        """The settings and data a finished step was made from, by dotted recipe name: a rerun whose values
        differ stops (exit 2) unless restart_from says to redo the step."""
        cfg = self.cfg
        if step in ("stage1", "stage2"):
            stage_cfg = getattr(cfg, step)
            sig = self._resume_signature(step, stage_cfg, self._dataset(step)[3])
            sig.update({f"{step}.lr": stage_cfg.lr, f"{step}.max_grad_norm": stage_cfg.max_grad_norm})
            if step == "stage1":
                sig["model.path (the base model)"] = _model_fingerprint(self.base_path)
            return sig
        if step == "merge":
            return {"model.path (the base model)": _model_fingerprint(self.base_path)}
        return {}

    def _step_upstream(self, step: str) -> dict:
        """Digests of the published artefacts a step reads: when one was rebuilt, the step is redone."""
        s1 = self._stage1_dir()
        paths = {"merge": {"stage1/adapters": self.out / "stage1" / "adapters"},
                 "stage2": {"merged_base": s1 / "merged_base"},
                 "final": {"merged_base": s1 / "merged_base", "stage2/adapters": self.out / "stage2" / "adapters"}}
        return {name: _dir_digest(path) for name, path in paths.get(step, {}).items()}

    def _recorded_inputs(self, step: str) -> dict | None:
        """What a finished step recorded it was made from; None when the step is not finished."""
        if step in ("stage1", "stage2"):
            path = self.out / step / "result.json"
            if not path.is_file() or not (self.out / step / "adapters" / integrity.MANIFEST_NAME).is_file():
                return None
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
                raise PipelineError(f"{path}: corrupted ({e}); rerun with restart_from={step} to redo {step}") from None
            return record.get("inputs", {}) if isinstance(record, dict) else {}
        target = self.out / ("merged_base" if step == "merge" else "final")
        if not (target / integrity.MANIFEST_NAME).is_file():
            return None
        return integrity.manifest_inputs(target)

    def _plan_steps(self) -> dict:
        """For each step: 'redo' (restart_from), 'check' (finished with the same settings: skipped if its
        upstream artefacts are the ones it was made from) or 'run'. Settings that differ from a finished
        step's stop the run here, before any compute."""
        order = list(self.steps)
        restart = self.cfg.restart_from
        plan = {}
        for step in order:
            if restart is not None and order.index(step) >= order.index(restart):
                plan[step] = "redo"
                continue
            recorded = self._recorded_inputs(step) if self.cfg.resume else None
            if recorded is None:
                plan[step] = "run"
                continue
            diffs = _differences(recorded.get("settings", {}), self._step_settings(step))
            if diffs:
                raise PipelineError(
                    f"{step} in {self.out} is finished, but was made with other settings or data: "
                    + "; ".join(diffs) + f". Restore them to reuse it, or rerun with restart_from={step} to redo "
                    f"{step} and every later step (or use another output_dir)")
            plan[step] = "check"
        return plan

    def _discard(self, step: str):
        """Remove a step's outputs (restart_from, or inputs rebuilt upstream) so it runs from scratch."""
        if self.rank == 0:
            for rel in STEP_OUTPUTS[step]:
                path = self.out / rel
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        barrier()

    def _train_stage(self, stage: str, data, model, stage_cfg, ds_config, measure_orthogonality: bool):
        dataset, stats, collate, data_key, eval_set = data
        if self.cfg.data.packing and not supports_packing(model):
            raise PipelineError(f"data.packing=true needs an attention implementation that reads packed "
                                f"position_ids (sdpa, eager, flash_attention_2), not "
                                f"{model.config._attn_implementation!r}; set data.packing=false")
        # The loss is computed inside the lm_head's forward, a chunk of labelled positions at a time (never
        # [tokens, vocab] fp32 logits); under ZeRO-3 that module's hooks gather the lm_head weight for it.
        install_chunked_lm_head(model, self.cfg.model.loss_chunk_tokens or None)
        use_fused_gated_mlp(model)  # the MLP activation keeps two [tokens, intermediate] tensors, not three
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        mark_adapter_leaf_modules(model, ds_config)
        n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                          for p in model.parameters() if p.requires_grad)
        ds_config = fit_reduce_bucket(ds_config, n_trainable)
        with self.memory.phase(f"{stage}/engine", trim=True):  # trim: the loader's freed temporaries
            trainer = StageTrainer(stage, model, dataset, collate, stage_cfg, ds_config, self.out / stage, self.rank,
                                   self.world, self.cfg.seed, self.cfg.logging, measure_orthogonality, self.trackers,
                                   self.cfg.fault_tolerance.max_nonfinite_steps,
                                   self._resume_signature(stage, stage_cfg, data_key),
                                   noise_drop_prob=self.cfg.adapters.noise_drop_prob if stage == "stage1" else 0.0,
                                   eval_dataset=eval_set)
        if self.cfg.resume:
            trainer.maybe_resume()
        log.info("%s: %d samples, %d optimizer steps (global batch %d = micro %d x ranks %d x accum %d), "
                 "%.2fM trainable parameters", stage, len(dataset), trainer.total_steps, trainer.global_batch,
                 trainer.micro, self.world, trainer.grad_accum, n_trainable / 1e6)
        with self.memory.phase(f"{stage}/train"):
            result = trainer.train()
        tensors = engine_tensor_bytes(trainer.engine)
        best = self.out / stage / "best_adapters"
        if stage_cfg.save_best and (best / integrity.MANIFEST_NAME).is_file():
            # The stage's output is its best validation step's adapters (written by the trainer when it was best).
            if self.rank == 0:
                integrity.verify_dir(best, "best adapters")
                tmp = self.out / stage / ".adapters.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(best, tmp)
                integrity.publish_dir(tmp, self.out / stage / "adapters")
                log.info("%s: keeping the adapters of step %s, the best validation loss (%.4f), as the stage's output",
                         stage, result.best_step, result.best_val_loss)
            barrier()
        else:
            adapter_io.save_adapters(model, self.out / stage / "adapters", extra={"stage": stage},
                                     is_writer=self.rank == 0)
        summary = {**result.summary(), "samples": len(dataset), "data": stats.to_dict(),
                   "host_memory": self._stage_memory(stage, tensors)}
        if measure_orthogonality:
            summary["orthogonality_residual"] = orthogonality_residual(model)
        barrier()
        if self.rank == 0:
            record = {"summary": summary, "result": result.to_state(),
                      "inputs": {"settings": self._step_settings(stage), "upstream": self._step_upstream(stage)}}
            integrity.atomic_write_text(self.out / stage / "result.json", json.dumps(record, indent=1))
        release_engine(trainer.engine)
        return summary

    def stage1(self):
        cfg = self.cfg
        ds_config = build_ds_config(cfg, cfg.stage1, self.world, self.dtype)
        with self.memory.phase("stage1/data"):
            data = self._dataset("stage1")  # bad data stops the run before the model is loaded
        with self.memory.phase("stage1/load"):
            model = load_base_model(self.base_path, self.dtype, cfg.model.attn_implementation, ds_config,
                                    cfg.model.trust_remote_code)
            torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
            add_stage1_adapters(model, cfg.adapters)
        return self._train_stage("stage1", data, model, cfg.stage1, ds_config, measure_orthogonality=False)

    def merge(self):
        """TAIA: fold the attention LoRA into the backbone, keep the Knowledge Aggregator apart."""
        target = self.out / "merged_base"
        if self.rank == 0:
            tmp = self.out / ".merged_base.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model = load_base_model(self.base_path, self.dtype, "sdpa", None, self.cfg.model.trust_remote_code)
            adapter_io.load_adapters(model, self.out / "stage1" / "adapters")
            merge_attention_lora(model)
            adapter_io.save_adapters(model, tmp / "knowledge_adapters", extra={"stage": "merged_base"})
            injected_failure("merge", 0, self.rank)  # half-written: the rerun must redo the merge
            from medcare_dist.export import prepare_for_release

            plain = remove_adapters(model)
            prepare_for_release(plain, self.tokenizer)  # merged_base is also what PEFT exports load as their base
            plain.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            integrity.publish_dir(tmp, target, inputs={"settings": self._step_settings("merge"),
                                                       "upstream": self._step_upstream("merge")})
            log.info("merge: attention LoRA folded, Noise Aggregator dropped -> %s", target)
        barrier()

    def _stage_memory(self, stage: str, tensors: dict) -> list[dict]:
        """Every rank's resident memory in this stage's phases (bytes) and its training tensors, in rank order."""
        mine = {"runtime": self.runtime_bytes, "tensors": tensors,
                "phases": {k: v for k, v in self.memory.as_dict().items() if k.startswith(stage + "/")}}
        return all_gather_object(mine)

    def _write_host_memory(self):
        """<output_dir>/host_memory.json: every rank's phases of this run (a collective) and a log table."""
        ranks = all_gather_object({"runtime": self.runtime_bytes, "phases": self.memory.as_dict()})
        if self.rank != 0 or not self.memory.available:
            return
        integrity.atomic_write_text(self.out / "host_memory.json", json.dumps({"ranks": ranks}, indent=1))
        names = list(ranks[0]["phases"])
        log.info("host memory per rank (GiB, resident set; peak within each phase / at its end):")
        log.info("  %-14s %s", "runtime", "  ".join(f"r{i} {r['runtime'] / GiB:6.2f}" for i, r in enumerate(ranks)))
        for name in names:
            log.info("  %-14s %s", name, "  ".join(
                f"r{i} {r['phases'][name]['peak'] / GiB:6.2f}/{r['phases'][name]['end'] / GiB:5.2f}"
                for i, r in enumerate(ranks) if name in r["phases"]))

    def _stage1_dir(self) -> Path:
        if "stage1" in self.steps:
            return self.out
        if not self.cfg.init_from:
            raise PipelineError("stage=2 needs init_from=<output_dir of a stage-1 run>")
        return Path(self.cfg.init_from)

    def stage2(self):
        cfg = self.cfg
        merged = self._merged_base()
        integrity.verify_dir_on_all_ranks(merged, "merged_base: rerun with restart_from=merge to rebuild it"
                                          if merged.parent == self.out else "merged_base of init_from",
                                          self.rank, self.world)
        meta = adapter_io.read_adapter_config(merged / "knowledge_adapters")
        ds_config = build_ds_config(cfg, cfg.stage2, self.world, self.dtype)
        with self.memory.phase("stage2/data"):
            data = self._dataset("stage2")
        protected = self._knowledge_input_bases(merged) if cfg.adapters.protect_inputs_energy > 0 else None
        with self.memory.phase("stage2/load"):
            model = load_base_model(merged, self.dtype, cfg.model.attn_implementation, ds_config,
                                    cfg.model.trust_remote_code)
            adapter_io.check_compatible(model, meta, merged / "knowledge_adapters")
            adapter_io.load_adapters(model, merged / "knowledge_adapters")
            torch.manual_seed(cfg.seed + 1)
            try:
                add_stage2_adapters(model, cfg.adapters, protected)
            except ValueError as e:  # an alignment rank the knowledge subspace of init_from leaves no room for
                raise PipelineError(f"adapters.align_rank={cfg.adapters.align_rank} on {merged}: {e}") from None
        return self._train_stage("stage2", data, model, cfg.stage2, ds_config, measure_orthogonality=True)

    def _merged_base(self) -> Path:
        merged = self._stage1_dir() / "merged_base"
        if not (merged / "config.json").is_file() or not (merged / "knowledge_adapters").is_dir():
            raise PipelineError(f"{merged}: not a finished stage-1 output (needs config.json and "
                                "knowledge_adapters/); run stage=1 first or fix init_from")
        return merged

    def _check_same_base(self, merged: Path):
        """Refuse, before any compute, a stage-1 output built on another base model than the recipe's."""
        if merged.parent == self.out:
            return
        ours = json.loads((self.base_path / "config.json").read_text())
        theirs = json.loads((merged / "config.json").read_text())
        diffs = [f"{k}: {theirs.get(k)!r} there vs {ours.get(k)!r} in model.path={self.base_path}"
                 for k in adapter_io.ARCH_FIELDS if ours.get(k) != theirs.get(k)]
        if diffs:
            raise PipelineError(f"init_from={self.cfg.init_from}: its stage-1 output was trained on another base "
                                "model (" + "; ".join(diffs) + ")")

    def final(self):
        target = self.out / "final"
        merged = self._stage1_dir() / "merged_base"
        if self.rank == 0:
            from medcare_dist.export import save_plain_hf

            integrity.verify_dir(merged, "merged_base")
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model = load_base_model(merged, self.dtype, "sdpa", None, self.cfg.model.trust_remote_code)
            adapter_io.load_adapters(model, self.out / "stage2" / "adapters")
            save_plain_hf(merge_all(model), tmp, tokenizer=self.tokenizer)
            integrity.publish_dir(tmp, target, inputs={"settings": {}, "upstream": self._step_upstream("final")})
            log.info("final: every adapter folded -> %s (a plain Hugging Face model)", target)
        barrier()

    def _general_reference(self):
        """Rank 0 records (once) the base model's answers to the general prompts, before any training."""
        if not self.cfg.evaluation.general_retention:
            return None
        from medcare_dist.eval.retention import RetentionError, ensure_reference

        outcome = None
        if self.rank == 0:
            try:
                ref = ensure_reference(self.base_path, self.out, self.cfg.model.dtype)
                log.info("general-ability reference: the base model's answers to %d general prompts in %s",
                         len(ref["prompts"]), self.out / "general_reference.json")
                outcome = ("ok", ref)
            except RetentionError as e:
                outcome = ("error", str(e))
        status, value = broadcast_object(outcome)
        if status == "error":
            raise PipelineError(value)
        return value

    # ----- driver -----------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        self._prepare_inputs()
        self._preflight()
        plan = self._plan_steps()
        if self.rank == 0 and self.cfg.logging.report_to:  # after every check: a refused run writes no tracker
            from medcare_dist.training.trackers import Trackers

            self.trackers = Trackers(self.cfg.logging.report_to, self.out,
                                     self.cfg.logging.run_name or self.out.name, self.cfg.to_dict(), self.cfg.logging)
        reference = self._general_reference()
        for step in self.steps:
            if plan[step] == "check":
                recorded = self._recorded_inputs(step).get("upstream", {})
                now = self._step_upstream(step)
                if recorded == now:
                    log.info("%s: already complete with these settings, data and inputs: skipping", step)
                    continue
                log.info("%s: its inputs were rebuilt since it finished (%s): redoing it", step,
                         "; ".join(_differences(recorded, now)))
                plan[step] = "redo"
            if plan[step] == "redo":
                log.info("%s: redoing it from scratch (%s)", step, f"restart_from={self.cfg.restart_from}"
                         if self.cfg.restart_from else "inputs changed")
                self._discard(step)
            # trim: what the previous step freed goes back to the OS before this one is measured
            with self.memory.phase(step, trim=True):
                getattr(self, step)()
                barrier()
            gc.collect()  # the step's model is in reference cycles (module hooks): free it before the next loads
        self._write_host_memory()
        report = None
        if self.rank == 0:
            from medcare_dist.report import write_report

            report = write_report(self.cfg, self.out, self._stage1_dir(), time.perf_counter() - t0,
                                  self.demo_assets, self.base_path, reference)
            log.info("report: %s", self.out / "report.md")
        if self.trackers is not None:
            if report is not None:
                from medcare_dist.training.trackers import final_metrics

                self.trackers.summary(final_metrics(report))
            self.trackers.close()
            self.trackers = None
        barrier()
        return report


def run(cfg) -> dict | None:
    pipeline = Pipeline(cfg)
    try:
        return pipeline.run()
    finally:
        if pipeline.trackers is not None:  # a run that stopped part-way: its trackers' runs end too
            pipeline.trackers.close()
        if pipeline.lock is not None:
            pipeline.lock.release()
