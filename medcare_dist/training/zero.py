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
