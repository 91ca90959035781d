"""Adapter checkpoints: `adapters.safetensors` plus `adapter_config.json`.

The JSON records every adapter layer's type and hyper-parameters and the base
model's architecture, so loading rebuilds the layers on a fresh base model and
refuses a model of another shape with a message naming what differs.
Only adapter tensors are gathered under ZeRO-3, one layer at a time, never
the 16-bit consolidated backbone.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from medcare_dist.method.adapters import ADAPTER_TYPES
from medcare_dist.errors import InputError
from medcare_dist.training import integrity
from medcare_dist.method.injection import replace_module, adapter_layers
from medcare_dist.training.zero import gathered

FORMAT = "medcare-dist-adapters"
VERSION = 1
WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size")


class AdapterCheckpointError(InputError, ValueError):
    pass


def architecture(model) -> dict:
    cfg = model.config
    return {f: getattr(cfg, f, None) for f in ARCH_FIELDS}


def _adapter_tensors(layer) -> dict:
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def save_adapters(model: nn.Module, out_dir, extra: dict | None = None, is_writer: bool = True):
    """Write every adapter layer's tensors and spec. A collective under ZeRO-3."""
    tensors, modules = {}, {}
    for name, layer in adapter_layers(model):
        params = _adapter_tensors(layer)
        with gathered(list(params.values())):
            if is_writer:
                for pname, p in params.items():
                    tensors[f"{name}.{pname}"] = p.detach().cpu().clone().contiguous()
        modules[name] = {**layer.spec(), "in_features": layer.in_features, "out_features": layer.out_features}
    if not is_writer:
        return None
    if not modules:
        raise ValueError("save_adapters: the model has no adapter layers")
    meta = {"format": FORMAT, "version": VERSION, "base_model": architecture(model), "modules": modules,
            **({"extra": extra} if extra else {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
    _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    integrity.write_manifest(out_dir)  # last: adapters are read back only when their digests match
    return out_dir


def _atomic_write(path: Path, write):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterCheckpointError(f"{path}: no adapter config (is {adapter_dir} an adapter directory?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterCheckpointError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise AdapterCheckpointError(f"{path}: not a readable adapter config ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise AdapterCheckpointError(f"{path}: not a {FORMAT} config (a JSON {type(meta).__name__})")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise AdapterCheckpointError(f"{path}: not a {FORMAT} v{VERSION} config "
                                     f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    return meta


def check_compatible(model, meta: dict, source) -> None:
    ours = architecture(model)
    diffs = [f"{k}: checkpoint {meta['base_model'].get(k)!r} vs model {ours[k]!r}"
             for k in ARCH_FIELDS if meta["base_model"].get(k) != ours[k]]
    if diffs:
        raise AdapterCheckpointError(f"{source}: adapters were trained on another base model ("
                                     + "; ".join(diffs) + ")")


@torch.no_grad()
def load_adapters(model: nn.Module, adapter_dir, roles=None) -> dict:
    """Rebuild the saved adapter layers on `model` (plain base) and load their tensors.

    `roles`, if given, restricts which LoRALinear roles are loaded. Returns the
    config's `extra` dict.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)  # first: the clearest message for a directory that is no adapter
    integrity.verify_dir(adapter_dir, "adapters")
    check_compatible(model, meta, adapter_dir / CONFIG_NAME)
    weights_path = adapter_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterCheckpointError(f"{weights_path}: missing adapter weights")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError, for a damaged file
        raise AdapterCheckpointError(f"{weights_path}: cannot read it ({type(e).__name__}: {e})") from None
    for name, spec in meta["modules"].items():
        if roles is not None and spec.get("role") not in roles:
            continue
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise AdapterCheckpointError(f"{adapter_dir}: module {name} is not in the model") from None
        if not isinstance(base, nn.Linear):
            raise AdapterCheckpointError(f"{adapter_dir}: {name} is a {type(base).__name__}, expected a plain "
                                         "nn.Linear to wrap (adapters already applied?)")
        if (base.in_features, base.out_features) != (spec["in_features"], spec["out_features"]):
            raise AdapterCheckpointError(
                f"{adapter_dir}: {name} is [{base.out_features} x {base.in_features}] in the model, "
                f"[{spec['out_features']} x {spec['in_features']}] in the checkpoint")
        cls = ADAPTER_TYPES.get(spec["type"])
        if cls is None:
            raise AdapterCheckpointError(f"{adapter_dir}: {name}: unknown adapter type {spec['type']!r}")
        layer = cls.from_spec(base, spec)
        for pname, p in _adapter_tensors(layer).items():
            key = f"{name}.{pname}"
            if key not in tensors:
                raise AdapterCheckpointError(f"{weights_path}: missing tensor {key}")
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise AdapterCheckpointError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, "
                                             f"expected {tuple(p.shape)}")
            p.copy_(tensors[key])
        replace_module(model, name, layer)
    return meta.get("extra", {})
