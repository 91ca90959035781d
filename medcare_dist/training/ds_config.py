"""The DeepSpeed config one stage trains with: the recipe's JSON found (checkout, working directory or the
installed package), read, its "auto" values filled with the project's choices, batch sizes, clipping and
precision taken from the recipe, and zero_optimization checked by DeepSpeed's own schema before any compute."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from medcare_dist.config import REPO_ROOT, SHIPPED, ConfigError, RunConfig, StageConfig, _kind

# Keys that only the recipe may decide; a DeepSpeed JSON may leave them out or repeat the same value.
_RECIPE_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping")


def resolve_ds_config_path(path: str) -> Path:
    """Absolute paths as given; relative ones from the repository root, else from the working directory, else
    (`ds_configs/<name>`) the installed package's copy."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in (REPO_ROOT, Path.cwd()):
        if (base / p).is_file():
            return base / p
    if p.parent == Path("ds_configs") and (SHIPPED["ds_configs"] / p.name).is_file():
        return SHIPPED["ds_configs"] / p.name
    return REPO_ROOT / p


def read_ds_json(path: str) -> dict:
    resolved = resolve_ds_config_path(path)
    if not resolved.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found (looked for {resolved}; relative paths are "
                          f"read from the repository root {REPO_ROOT} or the working directory)")
    try:
        data = json.loads(resolved.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {resolved}: not valid JSON: {e.msg} at line {e.lineno}, "
                          f"column {e.colno}") from None
    except OSError as e:
        raise ConfigError(f"DeepSpeed config {resolved}: cannot read it ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"DeepSpeed config {resolved}: not a text file (byte 0x{e.object[e.start]:02x} at "
                          f"offset {e.start} is not UTF-8)") from None
    except RecursionError:
        raise ConfigError(f"DeepSpeed config {resolved}: not valid JSON: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {resolved}: expected a JSON object at the top level")
    return data


def _strip_comments(value):
    """Drop `_`-prefixed keys: the JSON files document themselves there; DeepSpeed rejects unknown nested keys."""
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def _stage_name(cfg: RunConfig, stage_cfg: StageConfig) -> str:
    if stage_cfg is cfg.stage1:
        return "stage1"
    if stage_cfg is cfg.stage2:
        return "stage2"
    return "stage"


def build_ds_config(cfg: RunConfig, stage_cfg: StageConfig, world_size: int, dtype: str) -> dict:
    """The DeepSpeed config dict of one stage: the recipe's JSON plus batch sizes, clipping and precision."""
    name = _stage_name(cfg, stage_cfg)
    resolved = resolve_ds_config_path(cfg.deepspeed.config)
    ds = _strip_comments(copy.deepcopy(read_ds_json(cfg.deepspeed.config)))

    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"dtype must be resolved to fp32, bf16 or fp16 (see resolve_dtype), got {dtype!r}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config {resolved}: remove the '{section}' section; the trainer builds "
                              f"it from the recipe ({name}.lr, {name}.lr_scheduler, {name}.weight_decay)")

    micro, glob = stage_cfg.micro_batch_size, stage_cfg.global_batch_size
    per_step = micro * world_size
    if glob % per_step:
        below = (glob // per_step) * per_step
        above = below + per_step
        sizes = [s for s in (below, above) if s > 0]
        micros = [m for m in range(1, micro + 1) if glob % (m * world_size) == 0]
        hint = f"; or a micro_batch_size of {', '.join(map(str, micros[-3:]))}" if micros else ""
        raise ConfigError(
            f"{name}.global_batch_size={glob} is not divisible by {name}.micro_batch_size ({micro}) x world size "
            f"({world_size}) = {per_step}: use a global batch size of {' or '.join(map(str, sizes))}{hint}")
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": glob // per_step,
        "train_batch_size": glob,
        "gradient_clipping": float(stage_cfg.max_grad_norm),
    }
    for key in _RECIPE_OWNED:
        if key in ds and ds[key] != "auto" and ds[key] != wanted[key]:
            raise ConfigError(
                f"DeepSpeed config {resolved}: '{key}' is {ds[key]!r} but the recipe gives {wanted[key]!r}; "
                f"batch sizes and clipping come from the recipe ({name}.micro_batch_size, "
                f"{name}.global_batch_size, {name}.max_grad_norm): remove the key from the JSON")
    ds.update(wanted)

    # Precision follows the resolved dtype; other keys in these sections (loss scaling...) are kept.
    for key, on in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        section = ds.get(key)
        section = dict(section) if isinstance(section, dict) else {}
        section["enabled"] = on
        ds[key] = section
    _fill_auto(ds, resolved)
    _check_zero_section(ds, resolved)
    return ds


def project_zero_defaults() -> dict:
    """zero_optimization of ds_configs/zero3.json: the project's choice for every key a foreign config leaves
    "auto" (HF's "auto" persistence threshold, 10 x hidden, would partition almost every adapter tensor)."""
    return _strip_comments(read_ds_json("ds_configs/zero3.json"))["zero_optimization"]


def _fill_auto(ds: dict, resolved: Path):
    """Replace "auto" values (LLaMA-Factory's and HF's ds_z3_config.json) by the project's choices, so DeepSpeed
    never substitutes its own defaults silently; an "auto" the project has no choice for is an error."""
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        ours = project_zero_defaults()
        for key, value in list(zero.items()):
            if value == "auto":
                if key not in ours:
                    raise ConfigError(f"DeepSpeed config {resolved}: zero_optimization.{key} is \"auto\" and "
                                      "medcare-dist has no value for it: give a number")
                zero[key] = ours[key]

    def find(value, path):
        if value == "auto":
            yield path
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from find(v, f"{path}.{k}" if path else k)

    left = list(find(ds, ""))
    if left:
        raise ConfigError(f"DeepSpeed config {resolved}: {left[0]} is \"auto\" and medcare-dist has no value "
                          "for it (batch sizes, clipping, precision and zero_optimization are filled in; "
                          "give a value or remove the key)")


def _check_zero_section(ds: dict, resolved: Path):
    """zero_optimization checked by DeepSpeed's own schema now, not at deepspeed.initialize after stage 1."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"DeepSpeed config {resolved}: zero_optimization must be an object, got {_kind(zero)}")
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        field_path = ".".join(str(p) for p in ("zero_optimization", *first["loc"]))
        raise ConfigError(f"DeepSpeed config {resolved}: {field_path}: {first['msg']} "
                          f"(got {first.get('input')!r})") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"DeepSpeed config {resolved}: zero_optimization: {e}") from None
