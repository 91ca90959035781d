"""`launch/plan.py --measure`: stage-1 steps under a launcher with DeepSpeed's comms logger, compared with
the plan; --calibrate first times this machine's GEMM and all-gather rates so the predicted step time is its own."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from medcare_dist.cluster.model_shape import load_model_shape
from medcare_dist.cluster.planner import Cluster, Workload, plan, zero_settings


def comms_bytes(summary: dict, world: int) -> dict:
    """Payload bytes per collective from deepspeed.comm.log_summary(return_dict=True)['summary'].

    The comms logger records the size of the argument named `tensor`: the local shard for
    all_gather_into_tensor / all_gather (so the payload is that times the world size) and the whole
    input for reduce_scatter_tensor.
    """
    out = defaultdict(int)
    for name, sizes in summary.items():
        op = name.split("|")[0].strip()
        for size, rec in sizes.items():
            total = int(size) * int(rec["count"])
            if op in ("all_gather_into_tensor", "all_gather", "allgather_fn"):
                out["all_gather_bytes"] += total * world
            elif op in ("reduce_scatter_tensor", "reduce_scatter", "reduce_scatter_fn"):
                out["reduce_scatter_bytes"] += total
            elif op not in ("log_summary_barrier", "barrier"):
                out[f"{op}_bytes"] += total
    return dict(out)


def measure_main(args):
    """Stage-1 steps on random tokens with DeepSpeed's comms logger; compares the last step with the plan."""
    import os
    import time

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as dcomm

    from medcare_dist.config import load_config, resolve_dtype
    from medcare_dist.training.ds_config import build_ds_config
    from medcare_dist.training.distributed import barrier, init_distributed
    from medcare_dist.method.injection import add_stage1_adapters
    from medcare_dist.training.modeling import (device_type, enable_gradient_checkpointing, load_base_model,
                                                use_fused_gated_mlp)
    from medcare_dist.training.trainer import token_loss_sum
    from medcare_dist.training.zero import mark_adapter_leaf_modules, stop_backward_at_embedding

    if args.stage != 1:
        print("error: --measure runs stage 1 only", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    cfg = load_config(args.recipe or "demo",
                      args.overrides)
    model_path = args.model or cfg.model.path
    if not model_path or not Path(model_path).is_dir():
        model_path = _demo_model_dir(cfg, rank, barrier)
    args.model = str(model_path)
    dtype = resolve_dtype(args.dtype or cfg.model.dtype, device_type())
    args.dtype = dtype
    calibration = calibrate_rates(dtype, world) if args.calibrate else None
    if args.micro_batch:
        cfg.stage1.micro_batch_size = args.micro_batch
    if args.global_batch:
        cfg.stage1.global_batch_size = args.global_batch
    seq = args.seq_len or min(cfg.data.max_length, 128)
    ds = build_ds_config(cfg, cfg.stage1, world, dtype)
    if args.zero is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero
    if args.persistence_threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    model = load_base_model(model_path, dtype, cfg.model.attn_implementation, ds, cfg.model.trust_remote_code)
    torch.manual_seed(cfg.seed)
    add_stage1_adapters(model, cfg.adapters)
    use_fused_gated_mlp(model)  # as the pipeline trains it
    ckpt = args.ckpt if args.ckpt is not None else cfg.model.gradient_checkpointing
    if ckpt:
        enable_gradient_checkpointing(model)
    mark_adapter_leaf_modules(model, ds)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), config=ds)
    stop_backward_at_embedding(model)  # as the trainer does
    engine.train()
    dcomm.configure(enabled=True, prof_all=True)
    accum = ds["gradient_accumulation_steps"]
    micro = ds["train_micro_batch_size_per_gpu"]
    vocab = engine.module.config.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_last = 0.0
    for step in range(max(1, args.steps)):
        if step == max(1, args.steps) - 1:
            dcomm.reset_log()
            t0 = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), generator=gen).to(engine.device)
            out = engine(input_ids=ids, attention_mask=torch.ones_like(ids))
            engine.backward(token_loss_sum(out.logits, ids) / ids.numel())
            engine.step()
        t_last = time.perf_counter() - t0 if step == max(1, args.steps) - 1 else t_last
    summary = dcomm.log_summary(return_dict=True)["summary"]
    measured = comms_bytes(summary, world)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    static = _static_memory(engine)
    barrier()
    if rank != 0:
        return 0

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(1, world // max(1, local))
    shape = load_model_shape(str(model_path))
    zero = zero_settings(ds)
    work = Workload(stage=1, seq_len=seq, micro_batch=micro, global_batch=ds["train_batch_size"], dtype=dtype,
                    gradient_checkpointing=bool(ckpt))
    cluster = measured_cluster(args, nodes, world // nodes, calibration)
    predicted = plan(shape, cluster, work, zero, cfg.adapters)
    pc, pm = predicted["communication"], predicted["memory"]["per_gpu_bytes"]
    rows = []
    for key in ("all_gather_bytes", "reduce_scatter_bytes"):
        want, got = pc[key], measured.get(key, 0)
        rows.append({"collective": key.replace("_bytes", ""), "predicted": want, "measured": got,
                     "ratio": (got / want) if want else (1.0 if not got else float("inf"))})
    mem_rows = [
        {"what": "backbone weights (own shard + persistent)",
         "predicted": pm["backbone weights (own shard + persistent)"], "measured": static["frozen_bytes"]},
        {"what": "adapter weights", "predicted": pm["adapter weights"],
         "measured": static["trainable_bytes"]},
        {"what": "adapter optimizer states (fp32 master, Adam m, v)",
         "predicted": pm["adapter optimizer states (fp32 master, Adam m, v)"], "measured": static["optimizer_bytes"]},
    ]
    if peak is not None:
        mem_rows.append({"what": "peak allocated (total)", "predicted": predicted["memory"]["total_bytes"],
                         "measured": peak})
    pt = predicted["time"]
    step_time = {"predicted_s": pt["step_s"], "predicted_compute_s": pt["compute_s"],
                 "predicted_communication_s": pt["communication_s"], "measured_s": t_last,
                 "ratio": t_last / pt["step_s"] if pt["step_s"] else None,
                 "tokens_per_step": pt["tokens_per_step"], "rates": {"gpu_tflops": cluster.gpu_tflops,
                                                                     "link_gbs": pt["link_gbs_used"],
                                                                     "overlap": cluster.overlap}}
    report = {"model": str(model_path), "world": world, "seq_len": seq, "micro_batch": micro,
              "gradient_accumulation": accum, "dtype": dtype, "gradient_checkpointing": bool(ckpt),
              "zero": predicted["zero"], "communication": rows, "memory": mem_rows,
              "other_collectives": {k: v for k, v in measured.items()
                                    if k not in ("all_gather_bytes", "reduce_scatter_bytes")},
              "step_seconds_measured": t_last, "step_time": step_time, "calibration": calibration,
              "comms_log": summary}
    print(f"comms per optimizer step, measured by DeepSpeed's comms logger vs planned ({world} ranks, "
          f"ZeRO-{zero['stage']}, persistence threshold {zero['stage3_param_persistence_threshold']}, "
          f"checkpointing {'on' if ckpt else 'off'})")
    for r in rows:
        print(f"  {r['collective']:<16} predicted {r['predicted']:>14,d} B   measured {r['measured']:>14,d} B   "
              f"ratio {r['ratio']:.4f}")
    print("memory per rank (static parts)")
    for r in mem_rows:
        print(f"  {r['what']:<52} predicted {r['predicted']:>14,.0f} B   measured {r['measured']:>14,.0f} B")
    if calibration is not None:
        print(f"calibration: {calibration['gemm']['tflops']:.3f} TFLOP/s per rank ({calibration['gemm']['n']}^3 "
              f"{dtype} GEMM, {calibration['gemm']['threads']} threads, slowest rank), all-gather "
              f"{calibration['all_gather']['bus_gbs']:.2f} GB/s bus ({calibration['all_gather']['payload_bytes']:,d} B"
              f" gathered, {world} ranks)")
    print(f"optimizer step: predicted {step_time['predicted_s']:.3f} s (compute {pt['compute_s']:.3f} s at "
          f"{cluster.gpu_tflops:.3f} TFLOP/s, communication {pt['communication_s']:.3f} s at "
          f"{pt['link_gbs_used']:.2f} GB/s, {cluster.overlap:.0%} of it hidden), measured {t_last:.3f} s, "
          f"ratio {step_time['ratio']:.2f}")
    if args.measure_out:
        Path(args.measure_out).write_text(json.dumps(report, indent=1, default=str))
    return 0


def calibrate_rates(dtype: str, world: int, gemm_n: int = 2048, gather_bytes: int = 32 * 2**20,
                    repeats: int = 3) -> dict:
    """This machine's rates for plan(), measured on every rank at once, as training runs them: a square GEMM
    of the training dtype with the rank's own threads, and an all-gather through deepspeed.comm (the path
    ZeRO-3's parameter fetches take) of gather_bytes in all. Each figure is the slowest rank's (a synchronous
    step waits for it)."""
    import time

    import deepspeed.comm as dcomm
    import torch
    from deepspeed.accelerator import get_accelerator

    from medcare_dist.training.modeling import TORCH_DTYPES

    device = get_accelerator().current_device_name()
    torch_dtype = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(gemm_n, gemm_n, generator=gen).to(device, torch_dtype)
    b = torch.randn(gemm_n, gemm_n, generator=gen).to(device, torch_dtype)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dcomm.all_reduce(t, op=dcomm.ReduceOp.MAX)
        return float(t.item())

    def timed(fn) -> float:
        fn()  # warm-up: first-call allocation and, for the collective, connection set-up
        get_accelerator().synchronize()
        dcomm.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        get_accelerator().synchronize()
        return slowest((time.perf_counter() - t0) / repeats)

    gemm_s = timed(lambda: torch.mm(a, b))
    shard = torch.ones(max(1, gather_bytes // (4 * world)), dtype=torch.float32, device=device)
    gathered = torch.empty(shard.numel() * world, dtype=torch.float32, device=device)
    gather_s = timed(lambda: dcomm.all_gather_into_tensor(gathered, shard))
    payload = gathered.numel() * gathered.element_size()
    return {"gemm": {"n": gemm_n, "dtype": dtype, "threads": torch.get_num_threads(), "seconds": gemm_s,
                     "tflops": 2 * gemm_n ** 3 / gemm_s / 1e12},
            "all_gather": {"payload_bytes": payload, "world": world, "seconds": gather_s,
                           "bus_gbs": bus_gbs(payload, world, gather_s)}}


def bus_gbs(payload_bytes: float, world: int, seconds: float) -> float:
    """The link rate (GB/s) at which plan()'s ring model (_ring_seconds) moves payload_bytes in seconds."""
    if world <= 1:
        return float("inf")
    return payload_bytes * (world - 1) / world / seconds / 1e9


def measured_cluster(args, nodes: int, gpus_per_node: int, calibration: Optional[dict]) -> Cluster:
    """The Cluster --measure plans with: the command line's rates, or, calibrated, the measured GEMM rate as
    gpu_tflops and the measured all-gather rate as the link (intra- and, as it spans every rank, inter-node)."""
    tflops, intra, inter = args.gpu_tflops, args.intra_node_gbs, args.inter_node_gbs
    if calibration is not None:
        tflops = calibration["gemm"]["tflops"]
        intra = inter = calibration["all_gather"]["bus_gbs"]
    return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=args.gpu_mem, gpu_tflops=tflops,
                   intra_node_gbs=intra, inter_node_gbs=inter, pcie_gbs=args.pcie_gbs, overlap=args.overlap)


def _static_memory(engine) -> dict:
    """Bytes this rank holds for parameters (partitions + persistent) and the optimizer's fp32 state."""
    from medcare_dist.training.host_memory import engine_tensor_bytes

    held = engine_tensor_bytes(engine)
    trainable = 0
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        shard = getattr(p, "ds_tensor", None)
        if shard is None or getattr(p, "ds_persist", False):  # whole on this rank (persistent, or not ZeRO-3)
            trainable += getattr(p, "ds_numel", p.numel()) * p.element_size()
        else:
            trainable += shard.numel() * shard.element_size()
    return {"frozen_bytes": held["backbone partitions"] + held["backbone whole tensors (persistent or unpartitioned)"],
            "trainable_bytes": trainable,
            "optimizer_bytes": held["adapter fp32 master partitions"] + held["Adam moments"]}


def _demo_model_dir(cfg, rank, barrier) -> Path:
    """The embedded tiny demo model for --measure without a model path (built once, as the pipeline does)."""
    demo_dir = Path(cfg.output_dir) / "demo_assets"
    target = demo_dir / "base_model"
    if rank == 0 and not (target / "config.json").is_file():
        import shutil

        from medcare_dist.demo.assets import prepare_demo
        from medcare_dist.demo.base_model import build_demo_base

        assets = prepare_demo(demo_dir, seed=cfg.data.demo_seed)
        tmp = demo_dir / ".base_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_base(tmp, assets.tokenizer(), cfg.model.tiny, cfg.seed)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    barrier()
    return target
