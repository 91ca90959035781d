"""A rank's host memory: phase peaks from /proc, the training tensors by role, the stage engine freed, and the
planner's host-memory prediction against hand-computed figures."""

import dataclasses
import gc
import json
import weakref

import pytest
import torch

from medcare_dist.cluster.host_plan import CPU_RUNTIME_BYTES, host_memory
from medcare_dist.cluster.model_shape import ModelShape, build_model, unique_params
from medcare_dist.cluster.planner import Cluster, Workload, loss_bytes, plan, zero_settings
from medcare_dist.config import AdapterConfig
from medcare_dist.training import host_memory as hm

MiB = 2 ** 20
pytestmark = pytest.mark.skipif(not hm.PhaseMemory().available, reason="needs Linux /proc/self/clear_refs")


def test_a_phase_records_its_own_peak_and_nested_peaks_reach_the_outer_phase():
    mem = hm.PhaseMemory()
    with mem.phase("outer"):
        with mem.phase("inner"):
            big = torch.ones(256 * MiB // 4)  # 256 MiB, written: resident
            del big
        with mem.phase("after"):
            small = torch.ones(8 * MiB // 4)
            del small
    inner, after, outer = mem.records["inner"], mem.records["after"], mem.records["outer"]
    assert inner["peak"] - inner["start"] >= 0.95 * 256 * MiB
    assert inner["end"] < inner["peak"] - 200 * MiB  # freed (an allocation this large is mmapped)
    # The sibling's peak is its own: VmHWM was reset when it started.
    assert after["peak"] - after["start"] < 64 * MiB
    assert outer["peak"] >= inner["peak"]
    assert mem.peak() == outer["peak"]


DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                   "reduce_bucket_size": 200_000_000},
             "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}


def _engine():
    import deepspeed

    from medcare_dist.training.zero import fit_reduce_bucket

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = fit_reduce_bucket(json.loads(json.dumps(DS_CONFIG)), sum(p.numel() for p in model.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x = torch.randn(2, 64)
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    return engine, model


def test_engine_tensors_by_role_match_the_parameter_count(world):
    engine, model = _engine()
    n = sum(p.ds_numel for p in model.parameters())  # 64*128 + 128 + 128*8 + 8 = 9352, all trainable, fp32
    t = hm.engine_tensor_bytes(engine)
    assert t["adapter fp32 master partitions"] == 4 * n  # a world of one: the partition is everything
    assert t["Adam moments"] == 8 * n
    assert t["gradient partitions"] == 4 * n
    assert t["adapter partitions (training dtype)"] == 4 * n
    assert t["backbone partitions"] == 0 and t["backbone whole tensors (persistent or unpartitioned)"] == 0
    assert t["reduce buckets (allocated)"] == 4 * n  # fitted: not the configured 200M elements (763 MiB)
    from medcare_dist.training.zero import release_engine

    release_engine(engine)


def test_a_released_engine_frees_its_model(world):
    from medcare_dist.training.zero import release_engine

    engine, model = _engine()
    ref = weakref.ref(model)
    release_engine(engine)
    del engine, model
    gc.collect()
    assert ref() is None  # DeepSpeed's module stack and its coordinator's lru_cache no longer hold it


def test_the_reduce_bucket_is_fitted_to_the_trainable_elements_and_the_config_kept():
    from medcare_dist.training.zero import fit_reduce_bucket

    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 200_000_000}, "train_batch_size": 8}
    fitted = fit_reduce_bucket(ds, 12345)
    assert fitted["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 12345}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 200_000_000 and fitted["train_batch_size"] == 8
    assert fit_reduce_bucket(ds, 300_000_000) is ds  # more trainable elements than the bucket: several buckets
    assert fit_reduce_bucket({"zero_optimization": {"stage": 3}}, 10)["zero_optimization"] == {"stage": 3}


SHAPE = ModelShape(name="t", hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=5000)


def _plan(device="cpu", stage=1, offload=False, world=2):
    zero = zero_settings({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000,
                                                "stage3_prefetch_bucket_size": 100000}}, offload=offload or None)
    work = Workload(stage=stage, seq_len=300, micro_batch=1, global_batch=2 * world, dtype="fp32",
                    gradient_checkpointing=False, device=device)
    return plan(SHAPE, Cluster(nodes=1, gpus_per_node=world), work, zero, AdapterConfig())


def test_the_chunked_loss_row_is_one_chunk_of_logits_and_its_gradient():
    work = Workload(device="cpu")
    chunk = (16 * MiB) // (4 * 5000)  # 838 rows: more than the 300 tokens, so every row is one chunk
    assert loss_bytes(300, SHAPE, work) == 300 * 5000 * 4 + 300 * 256 * 4
    assert loss_bytes(10000, SHAPE, work) == chunk * 5000 * 4 + 10000 * 256 * 4
    assert loss_bytes(10000, dataclasses.replace(SHAPE, vocab_size=10**6), work) == \
        128 * 10**6 * 4 + 10000 * 256 * 4  # at least 128 rows
    gpu = Workload(device="cuda")
    # 1 GiB chunks: all at once; bf16: the GEMM's output and the gradient's copy beside the fp32 logits
    assert loss_bytes(10000, SHAPE, gpu, 2) == 10000 * 5000 * (4 + 2) + 10000 * 256 * 2
    assert _plan()["memory"]["per_gpu_bytes"]["logits and loss (fp32 chunks of labelled positions)"] == \
        loss_bytes(300, SHAPE, work)


def test_cpu_ranks_hold_the_whole_plan_and_rank0_the_checkpoint_and_the_merge():
    p = _plan()
    params = unique_params(build_model(SHAPE, AdapterConfig(), 1)[0])
    n_frozen = sum(q.numel for q in params if not q.trainable)
    largest = max(q.numel for q in params if not q.trainable)
    h = host_memory(p, "cpu")
    rows = p["memory"]["per_gpu_bytes"]
    live = sum(v for k, v in rows.items() if not k.startswith("runtime overhead"))
    assert h["phases"]["train"]["other"] == CPU_RUNTIME_BYTES + live + 2 * 100000 * 4
    static = rows["backbone weights (own shard + persistent)"] + rows["adapter weights"]
    assert h["phases"]["load"]["other"] == CPU_RUNTIME_BYTES + static + 2 * largest * 4
    # Rank 0: the whole checkpoint beside its partitions, or the others' gather peak if that is higher.
    assert h["phases"]["load"]["rank0"] == max(CPU_RUNTIME_BYTES + static + n_frozen * 4,
                                               h["phases"]["load"]["other"])
    assert h["phases"]["merge"]["rank0"] == CPU_RUNTIME_BYTES + n_frozen * 4 + p["parameters"]["trainable"] * 4
    assert h["phases"]["merge"]["other"] == CPU_RUNTIME_BYTES
    for name, ph in h["phases"].items():
        assert h["node_bytes"][name] == ph["rank0"] + ph["other"]  # 2 ranks per node
    assert h["node_peak_bytes"] == max(h["node_bytes"].values())


def test_gpu_ranks_hold_only_the_runtime_and_what_is_offloaded_while_training():
    runtime = 3 * 2 ** 30
    h = host_memory(_plan("cuda", world=8), "cuda", runtime_bytes=runtime)
    assert h["phases"]["train"]["other"] == runtime
    assert h["phases"]["load"]["other"] == runtime  # the gathered tensor is on the device
    p = _plan("cuda", offload=True, world=8)
    h = host_memory(p, "cuda", runtime_bytes=runtime)
    offloaded = sum(p["memory"]["cpu_bytes_per_node"].values()) / 8
    assert offloaded > 0 and h["phases"]["train"]["other"] == runtime + offloaded
    assert h["node_bytes"]["train"] == 8 * (runtime + offloaded)
    assert host_memory(_plan("cuda"), "cuda")["notes"]  # runtime not measured: said so
