"""The embedded demo: deterministic ICD-10-CM data with disjoint splits, idempotent builds, tokenizer and config."""

import json
import re

import pytest
import torch

from medcare_dist.demo import assets as demo
from medcare_dist.data.conversations import IGNORE_INDEX, collate, load_stage_dataset, tokenize_conversation


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def prompt(row):
    return row["messages"][0]["content"]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return demo.prepare_demo(tmp_path_factory.mktemp("demo_assets"), seed=0)


@pytest.fixture(scope="session")
def rows(assets):
    return {split: read_rows(path) for split, path in assets.files.items()}


@pytest.fixture(scope="session")
def tokenizer(assets):
    return assets.tokenizer()


def test_sizes_and_tasks(assets, rows):
    counts = {split: len(r) for split, r in rows.items()}
    assert 1000 <= counts["stage1_train"] <= 3000 and 400 <= counts["stage2_train"] <= 1000
    assert all(100 <= counts[s] <= 200 for s in ("stage1_eval", "stage2_eval"))
    assert assets.manifest["counts"] == counts
    assert {r["task"] for r in rows["stage1_train"]} == {"code_to_desc", "desc_to_code", "mcq"}
    assert {r["task"] for r in rows["stage1_eval"]} == {"code_to_desc", "desc_to_code", "mcq"}
    assert {r["task"] for r in rows["stage2_train"] + rows["stage2_eval"]} == {"cdn"}


def test_rows_are_consistent_with_icd(rows):
    icd = demo._icd()
    demo_codes = set(demo.select_codes())
    for r in rows["stage1_train"] + rows["stage1_eval"]:
        reply = r["messages"][1]["content"]
        assert icd.is_leaf(r["code"])
        if r["task"] == "mcq":
            assert r["options"][r["answer"]] == r["code"] and len(set(r["options"].values())) == 4
            assert reply == f"The answer is {r['answer']}." and demo.parse_mcq_answer(reply) == r["gold"]
            # Distractors are siblings whenever the answer has three of them among the demo codes.
            siblings = [c for c in icd.get_children(icd.get_parent(r["code"])) if c in demo_codes]
            if len(siblings) >= 4:
                assert set(r["options"].values()) <= set(siblings)
        elif r["task"] == "desc_to_code":
            assert demo.parse_code_answer(reply) == r["gold"] == r["code"]
        else:
            assert r["gold"] == icd.get_description(r["code"]) and reply.endswith(r["gold"])
    for r in rows["stage2_train"] + rows["stage2_eval"]:
        parsed = demo.parse_stage2_answer(r["messages"][1]["content"])
        assert parsed == r["gold"] == {"code": r["code"], "term": icd.get_description(r["code"])}
        assert prompt(r).startswith(demo.STAGE2_INSTRUCTION + "\nDiagnosis: ")


def test_mcq_answers_are_balanced(rows):
    for split in ("stage1_train", "stage1_eval"):
        letters = [r["answer"] for r in rows[split] if r["task"] == "mcq"]
        shares = [letters.count(x) / len(letters) for x in "ABCD"]
        assert max(shares) - min(shares) < 0.05


def test_eval_rows_are_disjoint_from_training(rows):
    for stage in ("stage1", "stage2"):
        train = {prompt(r) for r in rows[f"{stage}_train"]}
        evaluation = [prompt(r) for r in rows[f"{stage}_eval"]]
        assert len(set(evaluation)) == len(evaluation) and not train & set(evaluation)
    # Stage 2: no eval phrase is a training phrase up to case and spacing.
    def phrase(r):
        return re.sub(r"\s+", " ", prompt(r).split("Diagnosis: ", 1)[1].lower()).strip()
    assert not {phrase(r) for r in rows["stage2_train"]} & {phrase(r) for r in rows["stage2_eval"]}
    # The facts behind every eval row are taught in stage 1 training.
    taught = {r["code"] for r in rows["stage1_train"]}
    assert all(r["code"] in taught for r in rows["stage1_eval"] + rows["stage2_eval"])


def test_build_is_deterministic_and_seeded(assets, tmp_path):
    again = demo.build_demo_data(tmp_path / "same", seed=0)
    other = demo.build_demo_data(tmp_path / "other", seed=1)
    for split in demo.SPLITS:
        assert again[split].read_bytes() == assets.files[split].read_bytes()
        assert other[split].read_bytes() != assets.files[split].read_bytes()


def test_manifest_makes_the_build_idempotent(tmp_path):
    paths = demo.build_demo_data(tmp_path, seed=0, n_eval_mcq=20)
    manifest = json.loads((tmp_path / demo.MANIFEST_NAME).read_text())
    assert manifest["params"]["seed"] == 0 and manifest["params"]["simple_icd_10_cm_version"] == "1.5.0"
    stamps = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    demo.build_demo_data(tmp_path, seed=0, n_eval_mcq=20)
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == stamps

    original = paths["stage2_eval"].read_bytes()
    paths["stage2_eval"].write_text("tampered\n")  # a file that no longer matches its hash is rebuilt
    demo.build_demo_data(tmp_path, seed=0, n_eval_mcq=20)
    assert paths["stage2_eval"].read_bytes() == original

    demo.build_demo_data(tmp_path, seed=0, n_eval_mcq=30)  # other parameters: rebuilt
    assert json.loads((tmp_path / demo.MANIFEST_NAME).read_text())["counts"]["stage1_eval"] == 110
    assert not list(tmp_path.glob(".*.tmp"))


def test_prepare_demo_reuses_its_tokenizer(assets):
    stamp = (assets.tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    again = demo.prepare_demo(assets.root, seed=0)
    assert (again.tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.files == assets.files


def test_tokenizer_is_deterministic(assets, tmp_path):
    corpus = [assets.files["stage1_train"], assets.files["stage2_train"]]
    demo.build_demo_tokenizer(tmp_path / "again", corpus)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == \
        (assets.tokenizer_dir / "tokenizer.json").read_bytes()


def test_tokenizer_specials_and_chat_template(tokenizer):
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert len(set(ids)) == 3 and tokenizer.eos_token_id == tokenizer.pad_token_id == ids[0]
    assert 1000 <= len(tokenizer) <= 2000
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Code for HTN?"},
            {"role": "assistant", "content": "I10"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCode for HTN?<|im_end|>\n"
                    "<|im_start|>assistant\nI10<|im_end|>\n")
    prompt_text = tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt_text == text[: text.index("I10")]
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.count(ids[1]) == 3 and encoded.count(ids[2]) == 3
    assert tokenizer.decode(encoded) == text
    # Byte-level: text the tokenizer never saw still round-trips.
    for sample in ("Crohn’s disease – naïve", "糖尿病 E11.9", "dx:\tHTN\n"):
        assert tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample
    assert tokenizer.tokenize("E11.65")[:3] == ["E", "1", "1"]  # digits stay single


def test_sequences_are_short(assets, tokenizer, rows):
    for split, split_rows in rows.items():
        for r in split_rows:
            prompt_ids = tokenizer.apply_chat_template(r["messages"][:1], tokenize=False,
                                                       add_generation_prompt=True)
            assert len(tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]) < 96
            out = tokenize_conversation(tokenizer, r["messages"], 128)
            assert not out["truncated"]
    ds, stats = load_stage_dataset([{"path": str(assets.files["stage1_train"])}], tokenizer, 128)
    assert stats.num_rows == len(rows["stage1_train"]) and stats.longest_sequence <= 128


def test_model_config_fits_the_tokenizer(assets, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = demo.demo_model_config(tokenizer, num_hidden_layers=1)
    assert isinstance(config, Qwen2Config) and isinstance(assets.config, Qwen2Config)
    assert config.vocab_size % 64 == 0 and len(tokenizer) <= config.vocab_size < len(tokenizer) + 64
    assert config.tie_word_embeddings is False
    assert config.pad_token_id == config.eos_token_id == config.bos_token_id == tokenizer.eos_token_id
    assert (assets.config.hidden_size, assets.config.num_hidden_layers) == (128, 2)

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    ds, _ = load_stage_dataset([{"path": str(assets.files["stage2_eval"])}], tokenizer, 128)
    batch = collate([ds[i] for i in range(4)], tokenizer.pad_token_id)
    assert (batch["labels"] != IGNORE_INDEX).any()
    loss = model(**batch).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(config.vocab_size)).item()) < 1.0


def test_answer_parsers():
    assert demo.parse_mcq_answer("The answer is C.") == "C"
    assert demo.parse_mcq_answer("B. because") == "B"
    assert demo.parse_mcq_answer("no idea") is None
    assert demo.parse_stage2_answer('{"code": "E11.9", "term": "x"}<|im_end|>') == {"code": "E11.9", "term": "x"}
    assert demo.parse_stage2_answer('{"code": E11.9}') is None
    assert demo.parse_code_answer("The code is E11.3551.") == "E11.3551"
    assert demo.parse_code_answer("The code is E11.37X2.") == "E11.37X2"
    assert demo.format_stage2_answer("I10", "Essential (primary) hypertension") == \
        '{"code": "I10", "term": "Essential (primary) hypertension"}'
