"""Export a MedCare run for use without this project: `python -m medcare_dist.export {hf,peft}`.

- `hf`: the final model as a plain Hugging Face directory (safetensors weights, config, generation config,
  tokenizer with its chat template): `merged_base/` with the stage-2 adapters folded in by `merge_all`.
  `AutoModelForCausalLM.from_pretrained` loads it with no project code.
- `peft`: the stage-2 MLP adapters (Knowledge Aggregator + alignment LoRA) as a standard PEFT LoRA
  directory for the attention-merged base (`merged_base/`). Each projection's two LoRAs become one LoRA
  of rank r_k + r_a whose factors are the concatenated ones:
      lora_A = [knowledge_A; effective_align_A]   (r_k + r_a, in)   -- projected A_a in hard mode
      lora_B = [knowledge_B, align_B]             (out, r_k + r_a)
      lora_alpha = scaling * (r_k + r_a)          so PEFT's lora_alpha / r equals our scaling.
  The forward is then identical: W x + s (B_k A_k + B_a A_a) x.

Stage 1's routed mixture (MixtureOfLoRALinear: router + top-k experts) depends on the input and has no
LoRA (nor dense) equivalent: exporting it is refused, naming the module.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from medcare_dist.method.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterCheckpointError, check_compatible, read_adapter_config
from medcare_dist.method.adapters import ADAPTER_TYPES, LoRALinear, MixtureOfLoRALinear, OrthogonalLoRALinear
from medcare_dist.errors import InputError

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."                # PeftModel -> LoraModel -> the HF model
IM_END = "<|im_end|>"


class ExportError(InputError, ValueError):
    pass


def _refuse_mixture(name: str):
    raise ExportError(
        f"{name}: MixtureOfLoRALinear (stage 1's Noise Aggregator: a router with top-k routed LoRA experts) "
        "cannot be expressed in PEFT LoRA or folded into dense weights, because which experts apply depends on "
        "each token. Export after the TAIA merge instead: the stage-2 adapters (stage2/adapters) or the "
        "Knowledge Aggregator alone (merged_base/knowledge_adapters), on merged_base/")


@torch.no_grad()
def lora_factors(name: str, layer) -> dict:
    """{A, B, r, alpha, dropout} of one adapter layer as a single PEFT LoRA (float32)."""
    if isinstance(layer, MixtureOfLoRALinear):
        _refuse_mixture(name)
    if isinstance(layer, OrthogonalLoRALinear):
        a = torch.cat([layer.knowledge_A.float(), layer.effective_align_A().float()], dim=0)
        b = torch.cat([layer.knowledge_B.float(), layer.align_B.float()], dim=1)
    elif isinstance(layer, LoRALinear):
        a, b = layer.lora_A.float(), layer.lora_B.float()
    else:
        raise ExportError(f"{name}: {type(layer).__name__} has no PEFT LoRA mapping")
    r = a.shape[0]
    return {"A": a.detach().cpu().contiguous(), "B": b.detach().cpu().contiguous(), "r": r,
            "alpha": float(layer.scaling) * r, "dropout": layer.dropout_p}


def _layers_from_checkpoint(adapter_dir):
    """(name, adapter layer) of a saved adapter directory, one at a time, without loading the backbone.

    Each layer is rebuilt on an uninitialised float32 nn.Linear of the recorded shape (only its adapter
    tensors are read), so effective_align_A() is the layer's own computation.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterCheckpointError(f"{weights}: missing adapter weights")
    for name, spec in meta["modules"].items():  # refuse before any work
        if spec["type"] == MixtureOfLoRALinear.__name__:
            _refuse_mixture(name)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for name, spec in meta["modules"].items():
            cls = ADAPTER_TYPES.get(spec["type"])
            if cls is None:
                raise AdapterCheckpointError(f"{adapter_dir}: {name}: unknown adapter type {spec['type']!r}")
            base = torch.nn.utils.skip_init(nn.Linear, spec["in_features"], spec["out_features"], bias=False,
                                            dtype=torch.float32)
            layer = cls.from_spec(base, spec)
            for pname, p in layer.named_parameters():
                if pname.startswith("base."):
                    continue
                key = f"{name}.{pname}"
                if key not in keys:
                    raise AdapterCheckpointError(f"{weights}: missing tensor {key}")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise AdapterCheckpointError(f"{weights}: {key} has shape {tuple(t.shape)}, expected "
                                                 f"{tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
            yield name, layer
            del layer, base


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def write_peft(named_layers, out_dir, base_model_name_or_path: str | None = None, tokenizer_dir=None) -> Path:
    """Write a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for the given layers."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, info = {}, {}
    for name, layer in named_layers:
        f = lora_factors(name, layer)
        # PEFT's key naming (get_peft_model_state_dict): adapter name removed, HF module path kept.
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f["A"]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f["B"]
        info[name] = f
    if not info:
        raise ExportError("no adapter layers to export")
    r = _most_common(v["r"] for v in info.values())
    alpha = _most_common(v["alpha"] for v in info.values())
    config = LoraConfig(
        r=r, lora_alpha=alpha,
        target_modules=sorted(info),  # full module names: PEFT matches them exactly
        rank_pattern={n: v["r"] for n, v in info.items() if v["r"] != r},
        alpha_pattern={n: v["alpha"] for n, v in info.items() if v["alpha"] != alpha},
        lora_dropout=_most_common(v["dropout"] for v in info.values()),
        bias="none", use_rslora=False, fan_in_fan_out=False, task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, tmp)
    (tmp / "README.md").write_text(
        "# MedCare stage-2 adapters as PEFT LoRA\n\n"
        "Knowledge Aggregator and alignment LoRA of each MLP projection, concatenated into one LoRA of rank "
        "r_k + r_a (lora_alpha = scaling x rank). Load on the attention-merged base:\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(base_model_name_or_path or '<merged_base>')!r})\n"
        "model = PeftModel.from_pretrained(base, '<this directory>')\n```\n", encoding="utf-8")
    _publish(tmp, out_dir)
    return out_dir


def _copy_tokenizer(src, dst):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError):
        return None
    tok.save_pretrained(str(dst))
    return tok


def _publish(tmp: Path, final: Path):
    from medcare_dist.training.integrity import share_modes

    share_modes(tmp)  # readable by the group as the umask allows, not save_pretrained's 0600
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _check_base(base_dir, adapter_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    meta = read_adapter_config(adapter_dir)
    check_compatible(type("Base", (), {"config": cfg})(), meta, Path(adapter_dir) / CONFIG_NAME)


def export_peft(base_dir, adapters_dir, out_dir) -> Path:
    """The adapters of `adapters_dir` as a PEFT LoRA directory for the model in `base_dir` (merged_base/).

    Only adapter tensors are read (no backbone is loaded); the base is checked against the adapters'
    recorded architecture and written as base_model_name_or_path.
    """
    base_dir = Path(base_dir).resolve()
    _check_base(base_dir, adapters_dir)
    return write_peft(_layers_from_checkpoint(adapters_dir), out_dir, str(base_dir), tokenizer_dir=base_dir)


def export_peft_from_model(model, out_dir, base_model_name_or_path=None) -> Path:
    """Like export_peft for an in-memory model carrying adapter layers."""
    from medcare_dist.method.injection import adapter_layers

    return write_peft(adapter_layers(model), out_dir, base_model_name_or_path)


def prepare_for_release(model, tokenizer=None):
    """The config a saved model is loaded and generated with: KV cache on (training turns it off) and
    generation stopping at <|im_end|> as well as at eos and the base's own stops, so generate (plain or through
    PEFT) ends the turn."""
    model.config.use_cache = True
    gen = model.generation_config
    if tokenizer is not None:
        stops = [tokenizer.convert_tokens_to_ids(IM_END)] if IM_END in tokenizer.get_vocab() else []
        stops += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # Keep the base's own stops too (Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
        stops += gen.eos_token_id if isinstance(gen.eos_token_id, list) else (
            [gen.eos_token_id] if gen.eos_token_id is not None else [])
        if stops:
            gen.eos_token_id = list(dict.fromkeys(stops)) if len(set(stops)) > 1 else stops[0]
        if tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id


def save_plain_hf(model, out_dir, tokenizer=None, dtype=None) -> Path:
    """Save a model without adapter layers as a plain HF directory (safetensors, config, generation config,
    tokenizer + chat template), generation stopping at <|im_end|> when the tokenizer has it."""
    from medcare_dist.method.injection import adapter_layers

    if adapter_layers(model):
        raise ExportError(f"{adapter_layers(model)[0][0]}: the model still carries adapter layers; merge_all first")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype is not None:
        model = model.to(dtype)
    prepare_for_release(model, tokenizer)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    _publish(tmp, out_dir)
    return out_dir


def export_hf(base_dir, adapters_dir, out_dir, dtype: str = "auto") -> Path:
    """merged_base + stage-2 adapters -> one dense HF model (merge_all), saved in the base's dtype
    (or `dtype`); the merge itself runs in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from medcare_dist.method.adapter_io import load_adapters
    from medcare_dist.method.injection import merge_all
    from medcare_dist.training.modeling import TORCH_DTYPES

    base_dir = Path(base_dir)
    saved = getattr(AutoConfig.from_pretrained(str(base_dir), local_files_only=True), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved)
    target = (saved or torch.float32) if dtype == "auto" else TORCH_DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    load_adapters(model, adapters_dir)
    from medcare_dist.method.injection import adapter_layers

    for name, layer in adapter_layers(model, MixtureOfLoRALinear):
        _refuse_mixture(name)
    merge_all(model)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        print(f"warning: {base_dir}: the tokenizer has no chat template", file=sys.stderr)
    return save_plain_hf(model.eval(), out_dir, tokenizer, target)


def resolve_run(run_dir):
    """(merged_base, stage-2 adapters) of a run directory."""
    run = Path(run_dir)
    base, adapters = run / "merged_base", run / "stage2" / "adapters"
    if not (base / "config.json").is_file():
        raise ExportError(f"{run}: no merged_base/ (a stage=2 run keeps it in its init_from directory: pass "
                          "--base <init_from>/merged_base --adapters <run>/stage2/adapters)")
    if not (adapters / CONFIG_NAME).is_file():
        raise ExportError(f"{run}: no stage2/adapters/ (is stage 2 finished?)")
    return base, adapters


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m medcare_dist.export",
        description="Export a MedCare run: 'hf' = the final dense Hugging Face model (merged_base + stage-2 "
                    "adapters folded in); 'peft' = the stage-2 MLP adapters as a PEFT LoRA for merged_base.")
    p.add_argument("format", choices=("hf", "peft"))
    p.add_argument("--run", help="run directory (uses RUN/merged_base and RUN/stage2/adapters)")
    p.add_argument("--base", help="base HF directory (the attention-merged base, merged_base/)")
    p.add_argument("--adapters", help="medcare-dist adapter directory (stage2/adapters)")
    p.add_argument("--out", help="output directory (default RUN/export/<format>)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="hf: weight dtype to save (auto: the base's)")
    return p.parse_args(argv)


def run_cli(argv=None) -> Path:
    args = parse_args(argv)
    try:
        if args.run:
            base, adapters = resolve_run(args.run)
            base, adapters = Path(args.base or base), Path(args.adapters or adapters)
        elif args.base and args.adapters:
            base, adapters = Path(args.base), Path(args.adapters)
        else:
            raise ExportError("pass --run RUN_DIR, or --base DIR and --adapters DIR")
        out = Path(args.out) if args.out else (Path(args.run) / "export" / args.format if args.run else None)
        if out is None:
            raise ExportError("pass --out DIR")
        if args.format == "hf":
            export_hf(base, adapters, out, args.dtype)
        else:
            export_peft(base, adapters, out)
    except (ExportError, AdapterCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.format} export written to {out}")
    return out


def main(argv=None) -> int:
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
