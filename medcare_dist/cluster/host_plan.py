"""Host (CPU) memory per rank and per node, phase by phase, predicted from a plan.

The phases are those medcare_dist.training.host_memory measures: loading the backbone under zero.Init,
training, and rank 0's TAIA merge (the final merge is the same size). What each holds:

  every rank, always   runtime: the interpreter, torch, transformers, DeepSpeed, the process group and the
                       tokenizer (measured on the CPU, 0.58 GiB; a GPU rank adds the CUDA libraries' host
                       memory, which is not measured here: --host-runtime-gib sets it)
  load                 global rank 0 reads the whole checkpoint into host memory (transformers' ZeRO-3
                       loader: the other ranks see meta tensors; the file is memory-mapped and resident
                       in full by the end); on a CPU each rank also holds its partitions and gathers one
                       tensor at a time to copy it in (the all-gather's output plus the collective's
                       staging copy of the largest tensor, the embedding, which is loaded first)
  train                on a GPU only what is offloaded (optimizer states, parameter partitions); on a CPU
                       every row of the plan's per-GPU memory, plus the all-gather buffers in flight
                       (the prefetch bucket being filled and the one being used, at most the gathered set)
  merge (rank 0)       the whole base in the training dtype and the stage's adapters; the other ranks hold
                       only their runtime, having freed their stage-1 engines

A node's peak is the largest of the phases' sums over its ranks, since the ranks are in the same phase
at the same time (rank 0's merge runs while the others wait).
"""

from __future__ import annotations

from medcare_dist.cluster.model_shape import DTYPE_BYTES, GiB

# RSS of a rank before it loads any data or model (launch/bench_memory.py, 2-core CPU, 2026-12-01: 0.58 GiB on
# both the demo and the 0.5B run; torch 2.13, transformers 5.24, DeepSpeed 0.19.8).
CPU_RUNTIME_BYTES = int(0.58 * GiB)


def host_memory(p: dict, device: str = "cuda", runtime_bytes: int | None = None,
                checkpoint_dtype: str | None = None) -> dict:
    """Host bytes per rank (rank 0 and the others) in each phase, and per node, for plan() output `p`."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: cpu or cuda")
    notes = []
    if runtime_bytes is None:
        runtime_bytes = CPU_RUNTIME_BYTES
        if device != "cpu":
            notes.append("runtime: the CPU ranks' measured 0.58 GiB; a CUDA rank adds its libraries' host memory, "
                         "not measured here (--host-runtime-gib sets the whole figure)")
    w = DTYPE_BYTES[p["workload"]["dtype"]]
    ckpt_w = DTYPE_BYTES.get(checkpoint_dtype or p["workload"]["dtype"], w)
    n_frozen = p["parameters"]["frozen"]
    largest = p["parameters"]["largest_backbone_tensor"]
    world = p["cluster"]["world"]
    per_node = p["cluster"]["gpus_per_node"]
    gpu = p["memory"]["per_gpu_bytes"]

    def total(d):
        return float(sum(d.values()))

    cpu_node = p["memory"]["cpu_bytes_per_node"]
    zero = p["zero"]

    offloaded = sum(cpu_node.values()) / per_node if cpu_node else 0.0
    if device == "cpu":
        train = {k: v for k, v in gpu.items() if not k.startswith("runtime overhead")}
        if zero["stage"] == 3 and world > 1:
            # Never more than what is gathered at all (nothing, when every tensor persists).
            train["all-gather buffers in flight (2 prefetch buckets)"] = min(
                2 * zero["stage3_prefetch_bucket_size"] * w, gpu["gathered parameters (ZeRO-3 working set)"])
        static = gpu["backbone weights (own shard + persistent)"] + gpu["adapter weights"]
    else:
        train = {"offloaded states and partitions": offloaded} if offloaded else {}
        static = 0.0
    train = {"runtime": runtime_bytes, **train}
    # On a GPU the gathered tensor is on the device; rank 0 copies the checkpoint's host tensor into it.
    gather = 2 * largest * w if device == "cpu" and world > 1 and zero["stage"] == 3 else 0
    load_other = {"runtime": runtime_bytes, "own partitions (CPU training)": static,
                  "one gathered tensor + its staging copy": gather}
    # safetensors maps the file and the copies touch it tensor by tensor, so the checkpoint is resident in
    # full only at the end, when the largest gather (the embedding, the first module) is long over.
    load_rank0 = {"runtime": runtime_bytes, "own partitions (CPU training)": static,
                  "the whole checkpoint, read by rank 0": n_frozen * ckpt_w}
    if total(load_other) > total(load_rank0):
        load_rank0 = load_other
    merge_rank0 = {"runtime": runtime_bytes, "the whole base in the training dtype": n_frozen * w,
                   "adapters (fp32)": p["parameters"]["trainable"] * 4}

    phases = {"load": {"rank0": total(load_rank0), "other": total(load_other)},
              "train": {"rank0": total(train), "other": total(train)},
              "merge": {"rank0": total(merge_rank0), "other": float(runtime_bytes)}}
    node = {name: ph["rank0"] + (per_node - 1) * ph["other"] for name, ph in phases.items()}
    return {"device": device, "runtime_bytes": runtime_bytes,
            "components": {"load (rank 0)": load_rank0, "load (other ranks)": load_other, "train (every rank)": train,
                           "merge (rank 0)": merge_rank0},
            "phases": phases,
            "peak_rank0_bytes": max(ph["rank0"] for ph in phases.values()),
            "peak_other_bytes": max(ph["other"] for ph in phases.values()),
            "node_bytes": node, "node_peak_bytes": max(node.values()),
            "node_peak_phase": max(node, key=node.get), "ranks_per_node": per_node, "notes": notes}


def format_host_memory(h: dict) -> list[str]:
    """Report lines for host_memory()'s result."""
    lines = [f"host memory per rank ({h['device']} ranks, {h['ranks_per_node']} per node; runtime "
             f"{h['runtime_bytes'] / GiB:.2f} GiB each)",
             f"  {'phase':<10}{'rank 0':>12}{'other ranks':>14}{'node':>12}"]
    for name, ph in h["phases"].items():
        lines.append(f"  {name:<10}{ph['rank0'] / GiB:9.2f} GiB{ph['other'] / GiB:11.2f} GiB"
                     f"{h['node_bytes'][name] / GiB:9.2f} GiB")
    lines.append(f"  node peak {h['node_peak_bytes'] / GiB:.1f} GiB (in {h['node_peak_phase']})")
    lines += [f"  note: {n}" for n in h["notes"]]
    return lines
