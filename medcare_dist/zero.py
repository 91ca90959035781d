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
