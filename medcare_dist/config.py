"""Run configuration: nested dataclasses read from a YAML recipe plus dotted `key=value` overrides.

Every error names where the offending value came from (file and line, or the override) and the dotted field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from medcare_dist.errors import InputError

__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "TinyModelConfig", "DataSource", "DataConfig", "AdapterConfig",
    "StageConfig", "DeepSpeedSection", "LoggingConfig", "EvaluationConfig", "load_config", "resolve_dtype",
    "REPO_ROOT",
]

# The repository root: relative DeepSpeed config paths in recipes are written from here.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Where an installed (non-editable) package keeps launch/recipes and ds_configs (pyproject's package-dir map).
SHIPPED = {"launch/recipes": Path(__file__).resolve().parent / "shipped_recipes",
           "ds_configs": Path(__file__).resolve().parent / "shipped_ds_configs"}


def shipped_file(folder: str, name: str) -> Path | None:
    """launch/recipes/<name> or ds_configs/<name>: from the checkout, else from the installed package."""
    for base in (REPO_ROOT / folder, SHIPPED[folder]):
        if (base / name).is_file():
            return base / name
    return None


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe file, or the name of a shipped one (`demo`, `qwen1.5-7b.yaml`): what `medcare-train --recipe
    demo` finds after a pip install, outside any checkout."""
    path = Path(recipe).expanduser()
    if path.is_file() or "/" in recipe:
        return path
    shipped = shipped_file("launch/recipes", recipe if recipe.endswith((".yaml", ".yml")) else f"{recipe}.yaml")
    return shipped or path


STEPS = {"all": ("stage1", "merge", "stage2", "final"), "1": ("stage1", "merge"), "2": ("stage2", "final")}


class ConfigError(InputError):
    """A recipe, an override or a DeepSpeed JSON that cannot describe a valid run."""


# --------------------------------------------------------------------------- schema


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    path: Optional[str] = None  # None: the embedded tiny demo model (built from `tiny`)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    loss_chunk_tokens: int = 0  # lm_head rows per loss chunk; 0: auto (16 MiB of fp32 logits on CPU, 1 GiB on GPU)


@dataclass
class DataSource:
    # A json/jsonl/parquet/arrow/csv file, a folder of them, or a datasets.save_to_disk folder.
    path: str
    format: Literal["auto", "conversations", "sharegpt", "messages", "alpaca"] = "auto"
    max_samples: Optional[int] = None  # a seeded subset of the valid rows
    split: Optional[str] = None        # the split of a save_to_disk DatasetDict
    columns: dict[str, str] = field(default_factory=dict)  # {our field: the source's column}
    weight: float = 1.0                # sampling ratio: 2.0 every row twice, 0.5 a seeded half


@dataclass
class DataConfig:
    stage1: list[DataSource] = field(default_factory=list)  # empty: generated demo data, only with demo=true
    stage2: list[DataSource] = field(default_factory=list)
    stage1_eval: list[DataSource] = field(default_factory=list)  # validation files of stage 1
    stage2_eval: list[DataSource] = field(default_factory=list)
    # For a stage without validation files: this share (0 < v < 1) or number (v >= 1) of its rows is held out
    # (a seeded choice) and used as its validation set. 0: none.
    val_size: float = 0.0
    # Train a stage whose list above is empty on the generated ICD-10-CM demo tasks. Off by default: a
    # recipe that forgets a stage's data stops instead of training on demo data.
    demo: bool = False
    max_length: int = 3072
    on_bad_row: Literal["error", "skip"] = "error"
    demo_seed: int = 0
    packing: bool = True  # pack each micro-batch's samples into rows of <= max_length (medcare_dist.training.packing)
    # Stage 2 also trains on this many stage-1 rows per stage-2 row (a seeded subset of data.stage1): replay
    # against forgetting. 0: none.
    stage2_replay: float = 0.0


@dataclass
class AdapterConfig:
    # Targets: short names (q_proj, matched on every layer), `all` (every linear of the attention / MLP
    # blocks), or regular expressions matched in full against the module name (PEFT's rule for a string).
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    attn_rank: int = 16
    attn_alpha: float = 32.0
    attn_dropout: float = 0.05
    mlp_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    expert_rank: int = 16
    expert_alpha: float = 32.0
    num_experts: int = 8
    top_k: int = 2
    shared_rank: int = 32
    expert_dropout: float = 0.0
    router_aux_loss_coef: float = 0.0
    # Share of stage-1 micro-batches trained with the Noise Aggregator switched off, so the Knowledge
    # Aggregator (all the TAIA step keeps) must carry the knowledge alone (docs/method.md).
    noise_drop_prob: float = 0.5
    align_rank: int = 32
    align_alpha: float = 64.0
    orthogonality: Literal["hard", "soft", "both", "none"] = "hard"
    orthogonality_lambda: float = 1.0
    freeze_knowledge: bool = False
    # With hard orthogonality: also keep the alignment A out of the principal subspace holding this share of
    # the knowledge data's inputs to each layer (GPM style; medcare_dist.method.input_subspace). 0: off.
    protect_inputs_energy: float = 0.0


@dataclass
class StageConfig:
    epochs: int = 1
    max_steps: int = -1  # -1: no cap; a positive value caps the optimizer steps
    lr: float = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    micro_batch_size: int = 4
    global_batch_size: int = 128
    max_grad_norm: float = 1.0  # 0 disables clipping
    save_every: int = 200  # optimizer steps; 0: only at the end of the stage
    # Validation loss every this many optimizer steps and at the end (data.<stage>_eval or data.val_size); 0: off.
    eval_every: int = 0
    save_best: bool = False  # the stage ends with the adapters of its best validation loss, not its last
    early_stopping_patience: int = 0  # stop after this many evaluations without a better validation loss; 0: off


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3.json"  # relative to the repository root, or absolute


@dataclass
class LoggingConfig:
    log_every: int = 1
    # Experiment trackers, written by rank 0: TensorBoard under <output_dir>/tensorboard, Weights & Biases
    # (the wandb extra; WANDB_MODE=offline writes under <output_dir>/wandb), MLflow (the mlflow extra).
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""             # the trackers' run name; "": the output_dir's name
    project: str = "medcare-dist"  # the wandb project / MLflow experiment
    mlflow_tracking_uri: str = ""  # "": MLFLOW_TRACKING_URI if set, else a file store in <output_dir>/mlruns
    keep_last: int = 2
    progress_bar: bool = True
    peak_tflops: float = 0.0  # one device's peak for MFU; 0: the GPU's dense bf16 peak from a table (none on CPU)


@dataclass
class EvaluationConfig:
    # Record the base model's answers to general prompts before stage 1 and score every model along the
    # pipeline against them in the report (medcare_dist.eval.retention).
    general_retention: bool = True
    # The models report.md evaluates side by side (base, stage1 = with the Noise Aggregator, taia, final);
    # each is a CPU evaluation on rank 0 at the end of the run. [] evaluates none.
    report_models: list[str] = field(default_factory=lambda: ["base", "stage1", "taia", "final"])


@dataclass
class FaultToleranceConfig:
    max_nonfinite_steps: int = 3  # optimizer steps in a row with a NaN/inf loss or gradient before save-and-stop
    collective_timeout_s: int = 1800  # a collective waiting longer (a dead or hung rank) fails every rank


@dataclass
class RunConfig:
    seed: int = 42
    output_dir: str = "runs/demo"
    stage: Any = "all"  # "all", 1 or 2 (normalised: the string "all" or the int 1 / 2)
    init_from: Optional[str] = None  # stage=2 alone: output_dir of a stage-1 run (holds merged_base/)
    resume: bool = True
    # Redo this step and every later one even if finished (stage1, merge, stage2, final): what a rerun with
    # changed settings or data needs; without it such a rerun stops, naming what changed.
    restart_from: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=1))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=3))
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "RunConfig":
        """Rebuild (and re-validate) a configuration, e.g. one saved with to_dict()."""
        return _finish(_from_python(data, _Origin(source)))


# Keys that no longer exist, and what replaced them: a recipe that still has one stops with this message.
REPLACED_KEYS = {
    "logging.tensorboard": "logging.report_to, a list of trackers: [tensorboard] (the default), "
                           "[tensorboard, wandb, mlflow], or [] for none",
}

# Spellings accepted for enum fields, mapped to the canonical value.
_ALIASES = {
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "flash_attn": "flash_attention_2", "flash_attention": "flash_attention_2", "fa2": "flash_attention_2",
    "flash-attn": "flash_attention_2", "flash_attn2": "flash_attention_2", "flash-attention-2": "flash_attention_2",
}


# Names users bring from HF TrainingArguments / PEFT, which difflib does not find close enough.
_SYNONYMS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "lr_scheduler_type": "lr_scheduler",
    "per_device_train_batch_size": "micro_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
    "batch_size": "global_batch_size", "train_batch_size": "global_batch_size",
    "gradient_accumulation_steps": "global_batch_size", "save_steps": "save_every", "logging_steps": "log_every",
    "eval_steps": "eval_every", "load_best_model_at_end": "save_best", "save_total_limit": "keep_last", "max_seq_length": "max_length",
    "model_max_length": "max_length", "model_name_or_path": "path", "torch_dtype": "dtype",
}


# --------------------------------------------------------------------------- located YAML values


@dataclass
class _Origin:
    """Where a value was written: a file and line, or one command-line override."""
    source: str
    line: Optional[int] = None
    override: Optional[str] = None

    def describe(self) -> str:
        if self.override is not None:
            return f"override '{self.override}'"
        if self.line is not None:
            return f"{self.source}, line {self.line}"
        return self.source


_DEFAULT = _Origin("(default)")


@dataclass
class _Node:
    """A YAML value with its origin: value is a python scalar, dict[str, _Node] or list[_Node]."""
    value: Any
    origin: _Origin
    raw: Optional[str] = None  # a scalar's text as written, so str fields keep e.g. `2024` or `off` verbatim


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` / `3E5` as floats (YAML 1.1 wants a dot: `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _located(node: yaml.Node, loader: _Loader, source: str, override: Optional[str] = None) -> _Node:
    def origin(n: yaml.Node) -> _Origin:
        return _Origin(source, n.start_mark.line + 1, override)

    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve `<<:` merge keys like the safe constructor does
        out: dict[str, _Node] = {}
        seen: dict[str, _Origin] = {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            if not isinstance(key, str):
                raise ConfigError(f"{origin(knode).describe()}: key {key!r} is not a name")
            if key in seen:
                raise ConfigError(f"{origin(knode).describe()}: key '{key}' repeats the one at "
                                  f"{seen[key].describe()}")
            seen[key] = origin(knode)
            child = _located(vnode, loader, source, override)
            child.origin = origin(knode)  # report a mapping entry at its key's line
            out[key] = child
        return _Node(out, origin(node))
    if isinstance(node, yaml.SequenceNode):
        return _Node([_located(n, loader, source, override) for n in node.value], origin(node))
    value = loader.construct_object(node, deep=True)
    return _Node(value, origin(node), raw=node.value)


def _compose(text: str, source: str, override: Optional[str] = None) -> Optional[_Node]:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        return _located(root, loader, source, override)
    except yaml.YAMLError as e:
        where = f"override '{override}'" if override is not None else source
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        where = f"override '{override}'" if override is not None else source
        raise ConfigError(f"{where}: not valid YAML: nested too deeply to parse") from None
    finally:
        loader.dispose()


def _from_python(value: Any, origin: _Origin) -> _Node:
    if isinstance(value, dict):
        return _Node({str(k): _from_python(v, origin) for k, v in value.items()}, origin)
    if isinstance(value, (list, tuple)):
        return _Node([_from_python(v, origin) for v in value], origin)
    return _Node(value, origin, raw=None if value is None else str(value))


# --------------------------------------------------------------------------- overrides


def _apply_override(root: _Node, text: str) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected dotted.key=value, e.g. stage1.lr=1e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted key")
    origin = _Origin("command line", None, text)
    try:
        node = _compose(raw, "command line", text)
    except ConfigError:
        node = None
        if raw.strip():  # e.g. `output_dir=a: b` is not YAML but is clearly meant as text
            node = _Node(raw, origin, raw=raw)
    if node is None:
        node = _Node(None, origin, raw=None)
    _set_origin(node, origin)

    cur = root
    for i, part in enumerate(parts[:-1]):
        child = cur.value.get(part)
        if child is None or not isinstance(child.value, dict):
            # Create the section: unknown section names are reported by the schema walk, with a suggestion.
            child = _Node({}, origin)
            cur.value[part] = child
        cur = child
    last = parts[-1]
    existing = cur.value.get(last)
    if existing is not None and isinstance(existing.value, dict) and isinstance(node.value, dict):
        _merge(existing, node)  # `model.tiny={hidden_size: 64}` changes one field, keeps the others
    else:
        cur.value[last] = node


def _set_origin(node: _Node, origin: _Origin) -> None:
    node.origin = origin
    if isinstance(node.value, dict):
        for child in node.value.values():
            _set_origin(child, origin)
    elif isinstance(node.value, list):
        for child in node.value:
            _set_origin(child, origin)


def _merge(dst: _Node, src: _Node) -> None:
    for k, v in src.value.items():
        if k in dst.value and isinstance(dst.value[k].value, dict) and isinstance(v.value, dict):
            _merge(dst.value[k], v)
        else:
            dst.value[k] = v


# --------------------------------------------------------------------------- schema walk


class _Builder:
    """Turns a located tree into dataclasses, remembering each field's origin for later checks."""

    def __init__(self):
        self.origins: dict[str, _Origin] = {}

    def fail(self, origin: _Origin, path: str, msg: str):
        raise ConfigError(f"{origin.describe()}: {path}: {msg}")

    def build(self, cls, node: Optional[_Node], path: str, base=None):
        origin = node.origin if node is not None else _DEFAULT
        if node is None or node.value is None:
            items: dict[str, _Node] = {}
        elif isinstance(node.value, dict):
            items = node.value
        else:
            self.fail(origin, path or "(top level)", f"expected a mapping of fields, got {_kind(node.value)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, child in items.items():
            if key not in fields:
                dotted = f"{path}.{key}" if path else key
                prefix = f"{path}." if path else ""
                close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
                elsewhere = [p for p in _schema_paths(RunConfig) if p.rsplit(".", 1)[-1] == key]
                if dotted in REPLACED_KEYS:
                    self.fail(child.origin, dotted, f"this key was replaced by {REPLACED_KEYS[dotted]}")
                if _SYNONYMS.get(key) in fields:
                    hint = f"did you mean '{prefix}{_SYNONYMS[key]}'?"
                elif close:
                    hint = f"did you mean '{prefix}{close[0]}'?"
                    if len(close) > 1:
                        hint += " (or " + ", ".join(f"'{prefix}{c}'" for c in close[1:]) + ")"
                elif elsewhere:
                    hint = f"did you mean '{elsewhere[0]}'?"
                else:
                    hint = f"valid keys here: {', '.join(fields)}"
                self.fail(child.origin, dotted, f"unknown key; {hint}")
        kwargs = {}
        for name, f in fields.items():
            dotted = f"{path}.{name}" if path else name
            if name in items:
                default = None
                if f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()  # e.g. stage2's own defaults (epochs=3), not StageConfig()'s
                kwargs[name] = self.convert(hints[name], items[name], dotted, default)
                self.origins[dotted] = items[name].origin
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(origin, dotted, "required key is missing")
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)

    def convert(self, tp, node: _Node, path: str, default=None):
        origin, value = node.origin, node.value
        if path == "stage":
            return self._stage(node)
        if tp is DataSource and isinstance(value, str):
            return self.build(tp, _Node({"path": node}, origin), path)  # `- /data/x.json` means {path: ...}
        if dataclasses.is_dataclass(tp):
            return self.build(tp, node, path, default if dataclasses.is_dataclass(default) else None)
        o = typing.get_origin(tp)
        args = typing.get_args(tp)
        if o is typing.Union:
            inner = [a for a in args if a is not type(None)]
            if value is None:
                return None
            return self.convert(inner[0], node, path)
        if o is Literal:
            if value is None or isinstance(value, (dict, list)):
                self.fail(origin, path, f"expected one of {_choices(args)}, got {_kind(value)}")
            text = (node.raw if node.raw is not None else str(value)).strip()
            canon = _ALIASES.get(text.lower(), text.lower())
            if canon not in args:
                close = difflib.get_close_matches(text.lower(), list(args), n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.fail(origin, path, f"'{text}' is not one of {_choices(args)}{hint}")
            return canon
        if o is dict:
            if not isinstance(value, dict):
                self.fail(origin, path, f"expected a mapping, got {_kind(value)}")
            key_tp, value_tp = args
            return {k: self.convert(value_tp, n, f"{path}.{k}") for k, n in value.items()}
        if o is list:
            (item_tp,) = args
            if isinstance(value, list):
                items = value
            elif isinstance(value, (str, dict)) and value != "":
                items = [node]  # a single target / data source stands for a one-element list
            elif value is None:
                items = []
            else:
                self.fail(origin, path, f"expected a list, got {_kind(value)}")
            return [self.convert(item_tp, n, f"{path}[{i}]") for i, n in enumerate(items)]
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(origin, path, f"expected true or false, got {_kind(value)}")
            return value
        if tp is int:
            if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
                return int(value)  # `max_steps=1e3`
            if not isinstance(value, int) or isinstance(value, bool):
                self.fail(origin, path, f"expected an integer, got {_kind(value)}")
            return value
        if tp is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                self.fail(origin, path, f"expected a number, got {_kind(value)}")
            if not math.isfinite(value):
                self.fail(origin, path, f"expected a finite number, got {value}")
            return float(value)
        if tp is str:
            if value is None or isinstance(value, (dict, list)):
                self.fail(origin, path, f"expected a string, got {_kind(value)}")
            # Keep the text as written: `output_dir: 2024` is a directory name, not a number.
            return node.raw if node.raw is not None else str(value)
        raise AssertionError(f"unsupported schema type {tp!r} at {path}")

    def _stage(self, node: _Node):
        value = node.value
        text = (node.raw if node.raw is not None else str(value)).strip().lower()
        if not isinstance(value, (dict, list)) and not isinstance(value, bool):
            if text in ("1", "2"):
                return int(text)
            if text == "all":
                return "all"
        self.fail(node.origin, "stage", f"expected all, 1 or 2, got {_kind(value) if value is not None else 'null'}")


def _schema_paths(cls, prefix: str = "") -> list[str]:
    """Every dotted field name of the schema (list items are addressed by their list's name)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        out.append(dotted)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _schema_paths(tp, dotted + ".")
    return out


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string '{value}'"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _choices(args) -> str:
    return ", ".join(str(a) for a in args)


# --------------------------------------------------------------------------- value checks


def check_data_sources(cfg: RunConfig) -> list[str]:
    """Every stage the run trains has data files, or the recipe asks for the demo data (data.demo=true).
    Returns warnings (a data.demo=true nothing uses).

    Not part of load_config: the model recipes leave the lists empty for the user to fill in."""
    d, steps = cfg.data, STEPS[str(cfg.stage)]

    def fail(path: str, msg: str):
        raise ConfigError(f"{path}: {msg}")

    wanted = [s for s in ("stage1", "stage2") if s in steps]
    if "stage2" in steps and (d.stage2_replay > 0 or cfg.adapters.protect_inputs_energy > 0) and "stage1" not in wanted:
        wanted.insert(0, "stage1")  # stage 2 replays stage-1 rows or measures the knowledge inputs on them
    empty = [s for s in wanted if not getattr(d, s)]
    if empty and not d.demo:
        why = " (stage 2 replays its rows or measures the knowledge inputs on them)" if empty == ["stage1"] \
            and "stage1" not in steps else ""
        fail(f"data.{empty[0]}", f"no data files for {empty[0]}{why}: list them "
             f"(data.{empty[0]}='[{{path: /data/{empty[0]}.jsonl}}]'), or set data.demo=true to train on the "
             "generated ICD-10-CM demo tasks")
    if d.demo and not empty and cfg.model.path is not None:
        return ["data.demo=true is not used: every stage this run trains has its own data and model.path is set"]
    return []


def _validate(cfg: RunConfig, origins: dict[str, _Origin]) -> None:
    from medcare_dist.method.targets import pattern_error

    def fail(path: str, msg: str):
        where = path
        while where not in origins and where.endswith("]"):  # a list item without its own origin: its list's
            where = where[:where.rindex("[")]
        raise ConfigError(f"{origins.get(where, _DEFAULT).describe()}: {path}: {msg}")

    def positive(path: str, value):
        if not value > 0:
            fail(path, f"must be > 0, got {value}")

    def non_negative(path: str, value):
        if not value >= 0:
            fail(path, f"must be >= 0, got {value}")

    def unit_interval(path: str, value):
        if not 0.0 <= value < 1.0:
            fail(path, f"must be in [0, 1), got {value}")

    non_negative("seed", cfg.seed)
    if not cfg.output_dir.strip():
        fail("output_dir", "must not be empty")
    if cfg.stage == 2 and not cfg.init_from:
        fail("stage", "stage=2 alone needs init_from=<output_dir of a finished stage-1 run> "
                      "(the directory that holds merged_base/); or run stage=all")
    steps = STEPS[str(cfg.stage)]
    if cfg.restart_from is not None and cfg.restart_from not in steps:
        fail("restart_from", f"{cfg.restart_from!r} is not a step of stage={cfg.stage} (one of {', '.join(steps)})")

    t = cfg.model.tiny
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"):
        positive(f"model.tiny.{name}", getattr(t, name))
    if t.hidden_size % t.num_attention_heads:
        fail("model.tiny.num_attention_heads",
             f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        fail("model.tiny.num_key_value_heads",
             f"num_attention_heads {t.num_attention_heads} is not divisible by num_key_value_heads "
             f"{t.num_key_value_heads}")
    if cfg.model.path is not None and not cfg.model.path.strip():
        fail("model.path", "must not be empty (leave it out or null for the embedded demo model)")
    non_negative("model.loss_chunk_tokens", cfg.model.loss_chunk_tokens)
    non_negative("logging.peak_tflops", cfg.logging.peak_tflops)

    d = cfg.data
    positive("data.max_length", d.max_length)
    non_negative("data.demo_seed", d.demo_seed)
    non_negative("data.stage2_replay", d.stage2_replay)
    non_negative("data.val_size", d.val_size)
    if d.val_size >= 1 and d.val_size != int(d.val_size):
        fail("data.val_size", f"a share must be below 1 and a number of rows whole, got {d.val_size}")
    if d.val_size and not (cfg.stage1.eval_every or cfg.stage2.eval_every):
        fail("data.val_size", "given, but stage1.eval_every and stage2.eval_every are 0: nothing would read it")
    for stage in ("stage1", "stage2", "stage1_eval", "stage2_eval"):
        for i, src in enumerate(getattr(d, stage)):
            if not src.path.strip():
                fail(f"data.{stage}[{i}].path", "must not be empty")
            if src.max_samples is not None:
                positive(f"data.{stage}[{i}].max_samples", src.max_samples)
            positive(f"data.{stage}[{i}].weight", src.weight)

    a = cfg.adapters
    for name in ("attn_rank", "expert_rank", "shared_rank", "align_rank", "num_experts",
                 "attn_alpha", "expert_alpha", "align_alpha"):
        positive(f"adapters.{name}", getattr(a, name))
    if not 1 <= a.top_k <= a.num_experts:
        fail("adapters.top_k", f"must be between 1 and num_experts ({a.num_experts}), got {a.top_k}")
    unit_interval("adapters.attn_dropout", a.attn_dropout)
    unit_interval("adapters.expert_dropout", a.expert_dropout)
    non_negative("adapters.router_aux_loss_coef", a.router_aux_loss_coef)
    if not 0.0 <= a.noise_drop_prob <= 1.0:
        fail("adapters.noise_drop_prob", f"must be in [0, 1], got {a.noise_drop_prob}")
    non_negative("adapters.orthogonality_lambda", a.orthogonality_lambda)
    unit_interval("adapters.protect_inputs_energy", a.protect_inputs_energy)
    if a.protect_inputs_energy > 0 and a.orthogonality not in ("hard", "both"):
        fail("adapters.protect_inputs_energy", f"projects the alignment A, which orthogonality="
                                               f"{a.orthogonality} does not: use hard or both, or set it to 0")
    if not a.mlp_targets:
        fail("adapters.mlp_targets", "must name at least one MLP projection (the mixture-of-LoRA layers)")
    for name in ("attn_targets", "mlp_targets"):
        targets = getattr(a, name)
        for i, target in enumerate(targets):
            if not target.strip():
                fail(f"adapters.{name}[{i}]", "must not be empty")
            bad = pattern_error(target)
            if bad:
                fail(f"adapters.{name}[{i}]", f"{target!r} is {bad}")
        if len(set(targets)) != len(targets):
            fail(f"adapters.{name}", f"names a module twice: {targets}")
    both = sorted((set(a.attn_targets) & set(a.mlp_targets)) - {"all"})  # `all` means each block's own layers
    if both:
        fail("adapters.mlp_targets", f"{both} also in attn_targets: a linear layer takes one adapter")

    for stage in ("stage1", "stage2"):
        s: StageConfig = getattr(cfg, stage)
        positive(f"{stage}.epochs", s.epochs)
        if s.max_steps != -1 and s.max_steps <= 0:
            fail(f"{stage}.max_steps", f"must be -1 (no cap) or > 0, got {s.max_steps}")
        positive(f"{stage}.lr", s.lr)
        unit_interval(f"{stage}.warmup_ratio", s.warmup_ratio)
        non_negative(f"{stage}.weight_decay", s.weight_decay)
        positive(f"{stage}.micro_batch_size", s.micro_batch_size)
        positive(f"{stage}.global_batch_size", s.global_batch_size)
        if s.global_batch_size % s.micro_batch_size:
            fail(f"{stage}.global_batch_size",
                 f"{s.global_batch_size} is not a multiple of micro_batch_size {s.micro_batch_size}")
        non_negative(f"{stage}.max_grad_norm", s.max_grad_norm)
        non_negative(f"{stage}.save_every", s.save_every)
        non_negative(f"{stage}.eval_every", s.eval_every)
        non_negative(f"{stage}.early_stopping_patience", s.early_stopping_patience)
        has_eval = bool(getattr(cfg.data, f"{stage}_eval")) or cfg.data.val_size > 0
        if s.eval_every and not has_eval:
            fail(f"{stage}.eval_every", f"needs validation data: data.{stage}_eval files, or data.val_size to hold "
                 "out a share of the training rows")
        if (s.save_best or s.early_stopping_patience) and not s.eval_every:
            key = "save_best" if s.save_best else "early_stopping_patience"
            fail(f"{stage}.{key}", f"needs {stage}.eval_every > 0 (it acts on the validation loss)")
        if getattr(cfg.data, f"{stage}_eval") and not s.eval_every:
            fail(f"data.{stage}_eval", f"given, but {stage}.eval_every is 0: nothing would read it")

    for i, name in enumerate(cfg.evaluation.report_models):
        if name not in ("base", "stage1", "taia", "final"):
            fail("evaluation.report_models", f"item {i} '{name}' is not one of base, stage1, taia, final")

    lg = cfg.logging
    positive("logging.log_every", lg.log_every)
    positive("logging.keep_last", lg.keep_last)
    non_negative("fault_tolerance.max_nonfinite_steps", cfg.fault_tolerance.max_nonfinite_steps)
    positive("fault_tolerance.collective_timeout_s", cfg.fault_tolerance.collective_timeout_s)

    from medcare_dist.training.ds_config import read_ds_json  # it imports this module

    try:
        read_ds_json(cfg.deepspeed.config)
    except ConfigError as e:
        fail("deepspeed.config", str(e))


def _finish(root: Optional[_Node]) -> RunConfig:
    builder = _Builder()
    cfg = builder.build(RunConfig, root, "")
    _validate(cfg, builder.origins)
    return cfg


def load_config(recipe_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe (a path, or a shipped recipe's name), apply dotted `key=value` overrides in order,
    check every field."""
    path = resolve_recipe_path(str(recipe_path))
    recipe_path = str(path) if path.is_file() else recipe_path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"recipe {recipe_path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {recipe_path}: not a text file (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start} is not UTF-8)") from None
    root = _compose(text, str(recipe_path))
    if root is None:
        root = _Node({}, _Origin(str(recipe_path), 1))
    if not isinstance(root.value, dict):
        raise ConfigError(f"{root.origin.describe()}: the recipe must be a mapping of sections, "
                          f"got {_kind(root.value)}")
    for text in overrides:
        _apply_override(root, text)
    return _finish(root)


def resolve_dtype(requested: str, device_type) -> str:
    """auto: bf16 where the accelerator supports it, fp32 on CPU; explicit choices are checked, not changed."""
    dev = str(device_type).split(":")[0].lower()
    req = _ALIASES.get(str(requested).lower(), str(requested).lower())
    if req not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"model.dtype: '{requested}' is not one of auto, fp32, bf16, fp16")
    if dev == "cpu":
        # auto stays fp32 on CPU: CPU bf16 matmuls are slow on most hosts and the demo checks numbers.
        return "fp32" if req == "auto" else req
    bf16_ok = _bf16_supported(dev)
    if req == "auto":
        return "bf16" if bf16_ok else "fp16"
    if req == "bf16" and not bf16_ok:
        raise ConfigError(f"model.dtype=bf16: this {dev} device has no bf16 support; use fp16 or fp32")
    return req


def _bf16_supported(dev: str) -> bool:
    try:
        import torch

        if dev == "cuda":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_bf16_supported())
    except Exception:  # no torch / deepspeed accelerator for this device: be conservative
        return False
