"""The embedded default: ICD-10-CM knowledge and normalisation data, a BPE tokenizer and a tiny Qwen2 config.

Everything comes from the tabular list shipped in `simple_icd_10_cm`, so it is built offline, once,
and deterministically in the seed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
TOKENIZER_MARKER = "demo_tokenizer.json"
DATA_FORMAT_VERSION = 1
TOKENIZER_FORMAT_VERSION = 1
SPLITS = ("stage1_train", "stage1_eval", "stage2_train", "stage2_eval")

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML as Qwen2 renders it, minus Qwen's default system prompt (a tiny model
# gains nothing from it and every token costs on 2 CPU cores).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Cardio-metabolic, renal, respiratory and mood categories: common diagnoses whose leaves share wording, so
# a tiny model can pick up the structure. 174 billable codes: few enough that stage 1 teaches most of them
# within the demo's CPU budget (the large E11 / I25 / K50 families would add 117 more; docs/method.md).
DEFAULT_CATEGORIES = (
    "E03", "E66", "E78", "I10", "I11", "I12", "I20", "I21", "I48", "I50",
    "J18", "J20", "J44", "J45", "N18", "N39", "F32", "F41", "D50", "K21",
)

# Stage-2 answer format (CHIP-CDN shaped): one JSON object on one line, keys in this order.
STAGE2_INSTRUCTION = "Normalize the diagnosis to ICD-10-CM. Reply in JSON with code and term."

CODE_TO_DESC_TEMPLATES = (
    "What does ICD-10-CM code {code} mean?",
    "Describe ICD-10-CM code {code}.",
    "ICD-10-CM {code} is which condition?",
)
DESC_TO_CODE_TEMPLATES = (
    "What is the ICD-10-CM code for: {desc}?",
    "Which ICD-10-CM code means: {desc}?",
    "Give the ICD-10-CM code of: {desc}",
)
MCQ_TEMPLATE = "Which ICD-10-CM code is \"{desc}\"?\n{options}\nAnswer with A, B, C or D."
LETTERS = "ABCD"

# Clinical shorthand a chart might use for words of the tabular list (lower case, word-bounded).
SHORTHAND = (
    ("type 2 diabetes mellitus", ("t2dm", "dm2", "type ii diabetes", "niddm")),
    ("type 1 diabetes mellitus", ("t1dm", "type i diabetes")),
    ("diabetes mellitus", ("dm",)),
    ("chronic obstructive pulmonary disease", ("copd",)),
    ("chronic kidney disease", ("ckd", "chronic renal disease")),
    ("end stage renal disease", ("esrd",)),
    ("gastro-esophageal reflux disease", ("gerd", "reflux disease")),
    ("myocardial infarction", ("mi", "heart attack")),
    ("atrial fibrillation", ("afib", "af")),
    ("atrial flutter", ("aflutter",)),
    ("heart failure", ("hf", "cardiac failure")),
    ("hypertensive", ("htn",)),
    ("hypertension", ("htn", "high blood pressure")),
    ("major depressive disorder", ("mdd", "major depression")),
    ("generalized anxiety disorder", ("gad",)),
    ("iron deficiency anemia", ("ida",)),
    ("hyperlipidemia", ("hld",)),
    ("hypercholesterolemia", ("high cholesterol",)),
    ("pneumonia", ("pna",)),
    ("atherosclerotic heart disease", ("ashd", "coronary artery disease")),
    ("urinary tract infection", ("uti",)),
    ("crohn's disease", ("crohns", "cd")),
    ("hypothyroidism", ("hypothyroid",)),
    ("exacerbation", ("exac", "flare")),
    ("without", ("w/o",)),
    ("with", ("w/",)),
    (", unspecified", (" nos", ", unsp")),  # "nos" only reads right after the term it qualifies
    ("unspecified", ("unsp",)),
    ("right eye", ("od", "r eye")),
    ("left eye", ("os", "l eye")),
    ("bilateral", ("bilat",)),
    ("chronic", ("chr",)),
)
NOTE_PREFIXES = ("dx: ", "diagnosis: ", "assessment: ", "impression: ", "a/p: ")


@dataclass
class DemoAssets:
    """Paths of the built demo data and tokenizer, and the default tiny model config."""

    root: Path
    files: dict[str, Path]
    tokenizer_dir: Path
    config: object  # transformers.Qwen2Config at the default tiny sizes
    manifest: dict = field(default_factory=dict)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)


# ----- answer parsing (shared with evaluators) ---------------------------------------------------------

def format_stage2_answer(code: str, term: str) -> str:
    """The one structured stage-2 answer: `{"code": "E11.9", "term": "<ICD-10-CM description>"}`."""
    return json.dumps({"code": code, "term": term}, ensure_ascii=False)


def parse_stage2_answer(text: str) -> dict | None:
    """The {code, term} object of a generated stage-2 answer, or None when it is not one."""
    match = re.search(r"\{.*?\}", text, flags=re.S)
    if not match:
        return None
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("code"), str):
        return None
    return {"code": obj["code"], "term": obj.get("term") if isinstance(obj.get("term"), str) else None}


def parse_mcq_answer(text: str) -> str | None:
    """The option letter of a generated multiple-choice answer ("The answer is B." -> "B")."""
    match = re.search(r"answer is\s*\(?([A-D])\b", text) or re.match(r"\s*\(?([A-D])\b", text)
    return match.group(1) if match else None


def parse_code_answer(text: str) -> str | None:
    """The ICD-10-CM code in a generated desc_to_code answer ("The code is E11.9." -> "E11.9")."""
    match = re.search(r"\b([A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?)\b", text)
    return match.group(1) if match else None


# ----- ICD-10-CM subset ---------------------------------------------------------------------------------

def _icd():
    with warnings.catch_warnings():
        # The package reads its data through deprecated importlib.resources calls.
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm

        simple_icd_10_cm.get_description("E11")  # forces the lazy data load inside the filter
    return simple_icd_10_cm


def icd_package_version() -> str:
    return importlib.metadata.version("simple-icd-10-cm")


def select_codes(categories=DEFAULT_CATEGORIES, max_description_chars: int = 100) -> list[str]:
    """Billable (leaf) codes under `categories` whose description fits, in tabular-list order."""
    icd = _icd()
    codes = []
    for category in categories:
        if not icd.is_valid_item(category):
            raise ValueError(f"{category!r} is not an ICD-10-CM code")
        leaves = [category] if icd.is_leaf(category) else [c for c in icd.get_descendants(category) if icd.is_leaf(c)]
        codes += [c for c in leaves if len(icd.get_description(c)) <= max_description_chars]
    return codes


def _distractors(code: str, pool: list[str], rng: random.Random, icd, k: int = 3) -> list[str]:
    """k codes from `pool` nearest to `code` in the hierarchy: siblings first, then cousins, and so on."""
    parent = icd.get_parent(code)
    levels = [lambda c: icd.get_parent(c) == parent]
    levels += [lambda c, a=ancestor: icd.is_descendant(c, a) for ancestor in icd.get_ancestors(code)]  # nearest first
    chosen: list[str] = []
    for in_level in levels:
        level = [c for c in pool if c != code and c not in chosen and in_level(c)]
        rng.shuffle(level)
        chosen += level[: k - len(chosen)]
        if len(chosen) == k:
            return chosen
    rest = [c for c in pool if c != code and c not in chosen]
    return chosen + rng.sample(rest, k - len(chosen))


def _row(task: str, code: str, prompt: str, reply: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "task": task, "code": code, **extra}


def _mcq_row(code: str, desc: str, options: list[str], answer_index: int) -> dict:
    letter = LETTERS[answer_index]
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(options))
    return _row("mcq", code, MCQ_TEMPLATE.format(desc=desc, options=lines), f"The answer is {letter}.",
                answer=letter, options=dict(zip(LETTERS, options)), gold=letter)


def _build_stage1(codes, icd, rng: random.Random, n_eval_per_template_task: int, n_eval_mcq: int,
                  mcq_per_code: int):
    """Knowledge rows. Each code gets two of three phrasings per direction in training; the third phrasing
    of a sampled subset of codes is held out, so eval prompts are new while the facts were taught."""
    train, evaluation = [], []
    held_c2d = set(rng.sample(codes, min(n_eval_per_template_task, len(codes))))
    held_d2c = set(rng.sample(codes, min(n_eval_per_template_task, len(codes))))
    for code in codes:
        desc = icd.get_description(code)
        for task, templates, held, prompt_of, answer, gold in (
                ("code_to_desc", CODE_TO_DESC_TEMPLATES, held_c2d, lambda t: t.format(code=code),
                 f"{code}: {desc}", desc),
                ("desc_to_code", DESC_TO_CODE_TEMPLATES, held_d2c, lambda t: t.format(desc=desc),
                 f"The code is {code}.", code)):
            order = list(templates)
            rng.shuffle(order)
            for template in order[:2]:
                train.append(_row(task, code, prompt_of(template), answer, gold=gold))
            if code in held:
                evaluation.append(_row(task, code, prompt_of(order[2]), answer, gold=gold))

    # Multiple choice: answer positions cycle through A-D so no letter is a free win.
    train_prompts = set()
    slot = 0
    for code in codes:
        desc = icd.get_description(code)
        for _ in range(mcq_per_code):
            options = _distractors(code, codes, rng, icd)
            options.insert(slot % 4, code)
            row = _mcq_row(code, desc, options, slot % 4)
            slot += 1
            train_prompts.add(row["messages"][0]["content"])
            train.append(row)
    for i, code in enumerate(rng.sample(codes, min(n_eval_mcq, len(codes)))):
        desc = icd.get_description(code)
        for _attempt in range(20):
            options = _distractors(code, codes, rng, icd)
            options.insert(i % 4, code)
            row = _mcq_row(code, desc, options, i % 4)
            if row["messages"][0]["content"] not in train_prompts:
                evaluation.append(row)
                break
    return train, evaluation


def _apply_shorthand(text: str, rng: random.Random, max_swaps: int) -> str:
    def pattern(long):
        # ", unspecified" is shortened only where it closes the phrase or a clause.
        return rf"{re.escape(long)}(?=,|$)" if long.startswith(",") else rf"\b{re.escape(long)}\b"

    applicable = [(long, short) for long, short in SHORTHAND if re.search(pattern(long), text)]
    rng.shuffle(applicable)
    for long, short in applicable[:max_swaps]:
        text = re.sub(pattern(long), rng.choice(short), text, count=1)
    return text


def _clinical_variants(desc: str, rng: random.Random, n_tries: int = 12) -> list[str]:
    """Chart-style renderings of a description: lower case, shorthand, dropped brackets, reordered clauses."""
    base = desc.lower()
    out = []
    for _ in range(n_tries):
        text = base
        if rng.random() < 0.5:
            text = re.sub(r"\s*[\(\[][^\)\]]*[\)\]]", "", text)
        if rng.random() < 0.5 and text.count(", ") == 1 and not text.endswith(" eye"):
            head, tail = text.split(", ")
            # "x, unspecified" is charted as plain "x"; other trailing qualifiers move to the front.
            text = head if tail == "unspecified" else f"{tail} {head}"
        text = _apply_shorthand(text, rng, max_swaps=rng.randint(1, 3))
        if rng.random() < 0.35:
            text = rng.choice(NOTE_PREFIXES) + text
        text = re.sub(r"\s+", " ", text).strip(" ,")
        if text and text not in out:
            out.append(text)
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _build_stage2(codes, icd, rng: random.Random, n_eval: int, train_per_code: int):
    """CHIP-CDN-shaped rows: a clinical phrase (inclusion term or chart-style variant) -> {code, term}."""
    candidates: dict[str, list[str]] = {}
    owners: dict[str, set] = {}
    for code in codes:
        desc = icd.get_description(code)
        phrases = list(icd.get_inclusion_term(code)) + _clinical_variants(desc, rng)
        kept = []
        for phrase in phrases:
            if _norm(phrase) == _norm(desc) or any(_norm(phrase) == _norm(p) for p in kept):
                continue
            kept.append(phrase)
            owners.setdefault(_norm(phrase), set()).add(code)
        candidates[code] = kept
    # A phrase that several codes produce has no single right answer: drop it everywhere.
    for code in codes:
        candidates[code] = [p for p in candidates[code] if len(owners[_norm(p)]) == 1]

    def row(code, phrase):
        desc = icd.get_description(code)
        return _row("cdn", code, f"{STAGE2_INSTRUCTION}\nDiagnosis: {phrase}", format_stage2_answer(code, desc),
                    gold={"code": code, "term": desc})

    eligible = [c for c in codes if len(candidates[c]) >= 2]
    eval_codes = set(rng.sample(eligible, min(n_eval, len(eligible))))
    train, evaluation = [], []
    for code in codes:
        phrases = list(candidates[code])
        rng.shuffle(phrases)
        if code in eval_codes:
            evaluation.append(row(code, phrases.pop()))
        train += [row(code, p) for p in phrases[:train_per_code]]
    return train, evaluation


# ----- files --------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest_matches(out_dir: Path, params: dict) -> dict | None:
    manifest = _read_json(out_dir / MANIFEST_NAME)
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return None
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        if not path.is_file() or _sha256(path) != manifest.get("sha256", {}).get(split):
            return None
    return manifest


def build_demo_data(out_dir, seed: int = 0, categories=DEFAULT_CATEGORIES, max_description_chars: int = 100,
                    mcq_per_code: int = 2, n_eval_per_template_task: int = 40, n_eval_mcq: int = 80,
                    stage2_train_per_code: int = 3, n_eval_stage2: int = 150) -> dict[str, Path]:
    """Writes {stage1,stage2}_{train,eval}.jsonl and manifest.json under out_dir; a matching manifest skips the work.

    Rows are in the "messages" format with a "task" name ("code_to_desc", "desc_to_code", "mcq", "cdn"),
    the subject "code" and a "gold" answer; mcq rows also keep "options" (letter -> code) and "answer".
    """
    out_dir = Path(out_dir)
    params = {"format_version": DATA_FORMAT_VERSION, "seed": seed, "categories": list(categories),
              "max_description_chars": max_description_chars, "mcq_per_code": mcq_per_code,
              "n_eval_per_template_task": n_eval_per_template_task, "n_eval_mcq": n_eval_mcq,
              "stage2_train_per_code": stage2_train_per_code, "n_eval_stage2": n_eval_stage2,
              "simple_icd_10_cm_version": icd_package_version()}
    paths = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    if _manifest_matches(out_dir, params):
        return paths

    icd = _icd()
    codes = select_codes(categories, max_description_chars)
    # Independent streams per stage: changing one stage's sizes leaves the other's rows alone.
    stage1 = _build_stage1(codes, icd, random.Random(f"stage1-{seed}"), n_eval_per_template_task, n_eval_mcq,
                           mcq_per_code)
    stage2 = _build_stage2(codes, icd, random.Random(f"stage2-{seed}"), n_eval_stage2, stage2_train_per_code)
    rows = dict(zip(SPLITS, (*stage1, *stage2)))
    for split in ("stage1_train", "stage2_train"):
        random.Random(f"{split}-{seed}").shuffle(rows[split])

    out_dir.mkdir(parents=True, exist_ok=True)
    for split, path in paths.items():
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
    tasks = {split: {} for split in SPLITS}
    for split in SPLITS:
        for r in rows[split]:
            tasks[split][r["task"]] = tasks[split].get(r["task"], 0) + 1
    manifest = {
        "params": params,
        "num_codes": len(codes),
        "counts": {split: len(rows[split]) for split in SPLITS},
        "tasks": tasks,
        "sha256": {split: _sha256(paths[split]) for split in SPLITS},
        "stage2_answer_format": format_stage2_answer("<code>", "<ICD-10-CM description>"),
    }
    _write_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))  # written last: marks completion
    return paths


# ----- tokenizer ----------------------------------------------------------------------------------------

# GPT-2-style pre-tokenisation with every digit on its own (as Qwen2 does), so codes
# such as E11.65 split into characters the model can compose.
_PRETOKENIZE_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _corpus_texts(corpus_files):
    for path in corpus_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                for message in json.loads(line)["messages"]:
                    yield f"{message['role']}\n{message['content']}\n"


def build_demo_tokenizer(out_dir, corpus_files, vocab_size: int = 1536):
    """A byte-level BPE trained on `corpus_files` (messages JSONL) with Qwen's ChatML special tokens.

    Saved with save_pretrained into out_dir and returned as reloaded by AutoTokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS_TOKEN, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus_texts(corpus_files), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                      additional_special_tokens=[IM_START, IM_END], model_max_length=4096,
                                      clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def demo_model_config(tokenizer, hidden_size: int = 128, intermediate_size: int = 344, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, num_key_value_heads: int = 4,
                      max_position_embeddings: int = 512):
    """A tiny Qwen2 config whose vocabulary covers `tokenizer` (rounded up to a multiple of 64)."""
    from transformers import Qwen2Config

    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id)


def _tokenizer_is_current(tokenizer_dir: Path, data_sha: dict) -> bool:
    marker = _read_json(tokenizer_dir / TOKENIZER_MARKER)
    return (isinstance(marker, dict) and marker.get("data_sha256") == data_sha
            and marker.get("format_version") == TOKENIZER_FORMAT_VERSION
            and (tokenizer_dir / "tokenizer.json").is_file())


def prepare_demo(workdir, seed: int = 0) -> DemoAssets:
    """Builds (once) the demo data under workdir/data and the tokenizer under workdir/tokenizer.

    Every file or directory appears by os.replace of a finished temporary, so a
    crash never leaves a half-written asset that a later call would trust.
    """
    workdir = Path(workdir)
    data_dir, tokenizer_dir = workdir / "data", workdir / "tokenizer"
    files = build_demo_data(data_dir, seed=seed)
    manifest = _read_json(data_dir / MANIFEST_NAME)
    if not _tokenizer_is_current(tokenizer_dir, manifest["sha256"]):
        tmp = workdir / f".tokenizer.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_tokenizer(tmp, [files["stage1_train"], files["stage2_train"]])
        (tmp / TOKENIZER_MARKER).write_text(json.dumps(
            {"format_version": TOKENIZER_FORMAT_VERSION, "data_sha256": manifest["sha256"]}, indent=1))
        if tokenizer_dir.exists():
            stale = workdir / f".tokenizer.{os.getpid()}.stale"
            os.replace(tokenizer_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, tokenizer_dir)
    assets = DemoAssets(root=workdir, files=files, tokenizer_dir=tokenizer_dir, config=None, manifest=manifest)
    assets.config = demo_model_config(assets.tokenizer())
    return assets
