"""Replay of DeepSpeed ZeRO-3's parameter coordinator over one training step's module trace: which
parameters are all-gathered in which phase, and how many are gathered at once."""

from __future__ import annotations

from collections import defaultdict, deque


def training_trace(modules: dict, n_layers: int, checkpointing: bool) -> list:
    """Module order of one forward + backward, as DeepSpeed's coordinator records it (checked against its trace)."""

    def layer_forward(i):
        p = f"model.layers.{i}"
        return [p, f"{p}.input_layernorm", f"{p}.self_attn", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.post_attention_layernorm", f"{p}.mlp",
                f"{p}.mlp.gate_proj", f"{p}.mlp.act_fn", f"{p}.mlp.up_proj", f"{p}.mlp.down_proj"]

    def layer_backward(i, with_container):
        p = f"model.layers.{i}"
        return ([p] if with_container else []) + [
            f"{p}.mlp", f"{p}.mlp.down_proj", f"{p}.mlp.up_proj", f"{p}.mlp.act_fn", f"{p}.mlp.gate_proj",
            f"{p}.post_attention_layernorm", f"{p}.self_attn", f"{p}.self_attn.o_proj", f"{p}.self_attn.v_proj",
            f"{p}.self_attn.k_proj", f"{p}.self_attn.q_proj", f"{p}.input_layernorm"]

    fwd = ["", "model", "model.embed_tokens", "model.rotary_emb"]
    for i in range(n_layers):
        fwd += layer_forward(i)
    fwd += ["model.norm", "lm_head"]
    bwd = ["", "lm_head", "model", "model.norm"]
    for i in reversed(range(n_layers)):
        if checkpointing:  # reentrant checkpointing re-runs the layer's forward inside the backward
            bwd += [(name, "recompute") for name in layer_forward(i)] + layer_backward(i, with_container=False)
        else:
            bwd += layer_backward(i, with_container=True)
    # no "model.embed_tokens": the trainer detaches the embedding's output (training.zero.stop_backward_at_embedding)
    out = [(modules[n], "forward") for n in fwd]
    for item in bwd:
        name, phase = item if isinstance(item, tuple) else (item, "backward")
        out.append((modules[name], phase))
    return out


def simulate_zero3_fetches(trace, zero: dict) -> dict:
    """Replay DeepSpeed's PartitionedParameterCoordinator over one micro-step's trace (complete-trace mode).

    Returns the elements all-gathered per phase and the peak of gathered (non-persistent) elements.
    Mirrors: fetch of the module's unavailable parameters, prefetch of up to
    min(max_live - available, prefetch_bucket) elements further down the parameter trace, and release
    after the module unless the parameter was prefetched for a later use or reappears within
    max_reuse_distance elements of trace (counted over whole subtrees when the released module is a
    ZeRO-3 leaf, as DeepSpeed does). Under reentrant checkpointing, frozen parameters fetched by the
    recompute stay until the module's backward (DeepSpeed attributes them to the running backward).
    """
    prefetch_bucket = zero["stage3_prefetch_bucket_size"]
    max_live = zero["stage3_max_live_parameters"]
    max_reuse = zero["stage3_max_reuse_distance"]

    def params_of(module, recurse):
        return module.all_params() if recurse else list(module.params)

    param_order = []  # (param, step) in trace order, a module's parameters sorted by creation
    for step, (module, _) in enumerate(trace):
        for p in sorted({p.uid: p for p in params_of(module, module.leaf)}.values(), key=lambda p: p.uid):
            param_order.append((p, step))
    queue = deque(param_order)
    available: set = set()
    n_available = 0
    peak = 0
    most_recent = defaultdict(lambda: -10 ** 12)
    held: dict = {}  # uid -> module name whose backward releases it (checkpoint recompute)
    gathered = defaultdict(int)
    step_id = 0

    def gather(params, phase):
        nonlocal n_available, peak
        for p in params:
            if not p.persist and p.uid not in available:
                available.add(p.uid)
                n_available += p.numel
                gathered[phase] += p.numel
        peak = max(peak, n_available)

    def release(p):
        nonlocal n_available
        if p.uid in available:
            available.discard(p.uid)
            n_available -= p.numel

    for module, phase in trace:
        own = list({p.uid: p for p in params_of(module, module.leaf)}.values())
        gather(own, phase)
        not_fetched = {p.uid for p in own if most_recent[p.uid] < step_id}
        popped = set()
        while queue and len(popped) < len(not_fetched):
            p, at = queue.popleft()
            most_recent[p.uid] = at
            popped.add(p.uid)
        if prefetch_bucket > 0:
            budget = min(max_live - n_available, prefetch_bucket)
            numel, chosen = 0, {}
            while queue and numel < budget:
                p, at = queue.popleft()
                most_recent[p.uid] = max(most_recent[p.uid], at)
                if not p.persist and p.uid not in available and p.uid not in chosen:
                    chosen[p.uid] = p
                    numel += p.numel
            gather(chosen.values(), phase)
        step_id += 1
        # release after the module ran
        candidates = {p.uid: p for p in own if not p.persist}
        for uid in list(candidates):
            if most_recent[uid] > step_id:
                del candidates[uid]
        traversed = 0
        for later, _ in trace[step_id:]:
            if traversed >= max_reuse or not candidates:
                break
            for p in params_of(later, module.leaf):
                candidates.pop(p.uid, None)
                traversed += p.numel
        if phase == "recompute":
            # frozen parameters are attributed to the running backward: kept until this module's backward
            for p in own:
                if not p.persist and not p.trainable:
                    held[p.uid] = module.name
                    candidates.pop(p.uid, None)
        elif phase == "backward":
            for uid in [u for u, owner in held.items() if owner == module.name]:
                held.pop(uid)
                candidates[uid] = next(p for p in own if p.uid == uid)
        for uid, p in candidates.items():
            if uid not in held:
                release(p)
    return {"gathered": dict(gathered), "peak_gathered": peak}
