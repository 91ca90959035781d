"""ZeRO-3 helpers that degrade to no-ops on ordinary (unpartitioned) tensors."""

import contextlib


def is_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def gathered(params, modifier_rank=None):
    """Context in which ZeRO-3 partitioned `params` hold their full values.

    A collective under ZeRO-3: every rank must enter it with the same list.
    With `modifier_rank` set, that rank's in-place edits are broadcast back
    into the partitions on exit.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def mark_adapter_leaf_modules(model, ds_config: dict):
    """Under ZeRO-3, gather each adapter layer's parameters (base, router, adapters) as one unit.

    The layer reads its base weight and router inside one fused call rather
    than through the child modules' forwards, so their per-module gather
    hooks would not fire in time.
    """
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return
    from deepspeed.utils import set_z3_leaf_modules

    from medcare_dist.method.adapters import ADAPTER_TYPES

    present = [cls for cls in ADAPTER_TYPES.values() if any(isinstance(m, cls) for m in model.modules())]
    if present:
        set_z3_leaf_modules(model, present)


def _leaf_requiring_grad(module, inputs, output):
    return output.detach().requires_grad_(True)


def stop_backward_at_embedding(model):
    """Make the input embedding's output a leaf that requires grad. Call it after deepspeed.initialize.

    The first decoder layer's input must require grad: ZeRO-3 releases a module's parameters when the
    gradient of its input arrives, and reentrant checkpointing needs an input that requires grad. HF's
    enable_input_require_grads marks the embedding output instead, which leaves the backward running into
    the embedding module, so ZeRO-3 all-gathers the frozen embedding again for no gradient. Registered
    after ZeRO-3's own forward hooks, this detaches past them.
    """
    return model.get_input_embeddings().register_forward_hook(_leaf_requiring_grad)


def fit_reduce_bucket(ds_config: dict, n_trainable: int) -> dict:
    """The config with reduce_bucket_size at most the trainable element count.

    ZeRO allocates its gradient reduce bucket at the configured size whatever the model (200M elements in
    ds_configs/: 400 MB of bf16 per GPU); more than every gradient together never fills, so the bucket
    boundaries, and the reductions, are the same with the smaller one.
    """
    zo = ds_config.get("zero_optimization", {})
    size = zo.get("reduce_bucket_size")
    if not isinstance(size, (int, float)) or n_trainable <= 0 or size <= n_trainable:
        return ds_config
    return {**ds_config, "zero_optimization": {**zo, "reduce_bucket_size": int(n_trainable)}}


def release_engine(engine):
    """Let a finished stage's model and optimizer be freed before the next stage loads its own.

    Two module-level references in DeepSpeed's ZeRO-3 outlive the engine: its
    set-up pushes the top module onto parameter_offload.FWD_MODULE_STACK, which
    nothing pops, and the parameter coordinator's release list is an lru_cache
    on the class, keyed by coordinator and module. Without clearing both, the
    whole stage-1 engine (partitions, optimizer states, buffers) stays alive
    through stage 2: 1.3 GB per rank at 0.5B parameters on two ranks.
    """
    model = engine.module
    engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:
        return
    ours = {id(m) for m in model.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # The lru_cache sits inside DeepSpeed's nvtx wrapper (a closure, no __wrapped__).
    for cell in getattr(cached, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()  # every coordinator's entries: a live one refills its own next step
