"""Loading the frozen backbone: dtype, attention kernel, ZeRO-3 construction, checkpointing, the fused MLP
activation."""

import contextlib
import importlib.util
import logging
import types

import torch

from medcare_dist.errors import InputError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_attn_implementation(requested: str) -> str:
    """auto: flash-attn 2 when installed and on CUDA, otherwise PyTorch SDPA."""
    has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError("model.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
                         "(pip install '.[gpu]'); use sdpa or auto")
    return requested


@contextlib.contextmanager
def zero3_construction(ds_config: dict | None):
    """While active, HF from_pretrained builds the model under deepspeed.zero.Init.

    Each parameter is partitioned as soon as it is created and the checkpoint
    is loaded shard by shard into the partitions, so no rank ever holds the
    whole backbone. Outside ZeRO-3 it does nothing.
    """
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it here
    try:
        yield hf_ds
    finally:
        unset_hf_deepspeed_config()


class ModelLoadError(InputError):
    """A model directory that cannot be loaded; the message names it."""


def load_base_model(path, dtype: str, attn_implementation: str = "auto", ds_config: dict | None = None,
                    trust_remote_code: bool = False):
    """A frozen causal LM from a local HF directory (never a hub download)."""
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    attn = resolve_attn_implementation(attn_implementation)
    try:
        with zero3_construction(ds_config):
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=TORCH_DTYPES[dtype], attn_implementation=attn,
                trust_remote_code=trust_remote_code, local_files_only=True)
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        # A damaged or foreign file (transformers' messages do not always name it).
        raise ModelLoadError(f"model {path}: cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def enable_gradient_checkpointing(model):
    """Reentrant checkpointing.

    With a frozen ZeRO-3 backbone, non-reentrant recompute meets partitioned
    [0]-shaped weights; reentrant checkpointing re-runs the module forwards
    (and so ZeRO's gather hooks), but needs an input that requires grad or
    the adapters inside receive no gradient. transformers marks the embedding
    output for that (enable_input_require_grads); the trainer then detaches it
    past ZeRO-3's hooks (medcare_dist.training.zero.stop_backward_at_embedding).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


# Gated MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (transformers 5.24).
GATED_MLP_CLASSES = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP")
SILU_CLASSES = ("SiLUActivation", "SiLU")


def _fused_gated_mlp_forward(self, x):
    from kernels.swiglu import silu_mul

    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def use_fused_gated_mlp(model) -> int:
    """Compute each SiLU-gated MLP's activation with kernels.swiglu.silu_mul, which keeps two of the three
    [tokens, intermediate] tensors plain autograd keeps for the backward. The MLP's modules, parameter names
    and outputs are unchanged; MLPs of other classes or activations are left alone. Returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLP_CLASSES and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES:
            module.forward = types.MethodType(_fused_gated_mlp_forward, module)
            n += 1
    return n
