"""The evaluator: benchmark formats, both multiple-choice scorers, set/ROUGE-L scoring, the demo path, ranks."""

import json
import math

import pytest
import torch

from medcare_dist.eval import benchmarks as bm
from medcare_dist.eval import harness as ev
from medcare_dist.eval import scoring as sc
from medcare_dist.eval.benchmarks import BenchmarkError, Item
from medcare_dist.eval.harness import EvalSettings


# ----- answer extraction and scoring ------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("The answer is B.", ["B"]),
    ("Let me think. A is wrong, so the answer is D", ["D"]),
    ("The answer is A, C", ["A", "C"]),
    ("The correct answers are A and C.", ["A", "C"]),
    ("The answer is: (B)", ["B"]),
    ("The answer is **E**.", ["E"]),
    ("答案为AB", ["A", "B"]),
    ("答案是B。", ["B"]),
    ("正确答案：A、C、D", ["A", "C", "D"]),
    ("解析略，故选C", ["C"]),
    ("(C)", ["C"]),
    ("AC", ["A", "C"]),
    ("B. Hypertension", ["B"]),
    ("The answer is Aspirin.", None),          # a word starting with an option letter is not a letter
    ("The answer is F.", None),                # not one of the item's options
    ("A patient with chest pain", None),
    ("I am not sure.", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert sc.extract_choice(text, "ABCDE") == expected


def mcq_item(gold, multi=None, letters="ABCD"):
    return Item("f.jsonl", 1, "mcq", "t", [{"role": "user", "content": "q"}], sorted(gold),
                options=[(l, f"option {l}") for l in letters], multi=len(gold) > 1 if multi is None else multi,
                extractor="mcq")


def test_generated_mcq_scored_as_sets():
    multi = mcq_item(["A", "C"])
    assert sc.score_generation(multi, "The answer is C, A.") == {"pred": ["A", "C"], "parsed": True, "score": 1.0}
    assert sc.score_generation(multi, "答案为AC<|im_end|>junk")["score"] == 1.0
    partial = sc.score_generation(multi, "The answer is A.")
    assert partial["parsed"] and partial["score"] == 0.0        # a subset of the gold set is wrong
    assert sc.score_generation(multi, "The answer is A, B, C")["score"] == 0.0
    bad = sc.score_generation(multi, "no idea")
    assert bad == {"pred": None, "parsed": False, "score": 0.0}
    single = mcq_item(["B"])
    assert sc.score_generation(single, "The answer is B")["score"] == 1.0


def test_select_options():
    scores = {"A": -0.5, "B": -3.0, "C": -0.6, "D": -4.0}
    assert sc.select_options(scores, multi=False) == ["A"]
    # softmax: A 0.47, C 0.43, B 0.04, D 0.01 -> above 1/4: A and C
    assert sc.select_options(scores, multi=True) == ["A", "C"]
    assert sc.select_options(scores, multi=True, threshold=0.45) == ["A"]
    assert sc.select_options(scores, multi=True, threshold=0.99) == ["A"]  # the argmax is always kept
    assert sc.select_options(scores, multi=True, mode="top-gold", n_gold=3) == ["A", "B", "C"]


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 1
    assert sc.rouge_l("The cat sat on the mat.", "the cat on the mat") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    # characters for Chinese: LCS("高血压病", "高血压") = 3: P = 3/4, R = 1
    assert sc.rouge_l("高血压病", "高血压") == pytest.approx(6 / 7)
    assert sc.rouge_l("E11.9 type 2 糖尿病", "type 2 糖尿病") == pytest.approx(2 * (5 / 7) / (5 / 7 + 1))
    assert sc.rouge_l("", "x") == 0.0 and sc.rouge_l("abc", "abc") == 1.0 and sc.rouge_l("a b", "c d") == 0.0


def test_set_items_and_micro_f1():
    gold = ["高血压", "2型糖尿病"]
    assert sc.parse_set_answer('实体：["高血压", "冠心病"]') == sorted(["高血压", "冠心病"])
    assert sc.parse_set_answer("高血压；2型糖尿病") == sorted(gold)
    assert sc.parse_set_answer("高血压##2型糖尿病") == sorted(gold)
    assert sc.parse_set_answer("[]") == [] and sc.parse_set_answer("   ") is None
    assert sc.parse_set_answer('[{"entity": "Fever", "type": "sym"}]') == [bm.norm_set_item({"entity": "fever",
                                                                                            "type": "sym"})]
    items = [Item("f", i, "set", "ner", [{"role": "user", "content": "x"}], sorted(g), extractor="set")
             for i, g in enumerate([gold, ["发热"], ["咳嗽", "发热"]])]
    outputs = ['["高血压", "冠心病"]', "", "咳嗽，发热"]
    records = [ev._record(it, "generate", sc.score_generation(it, o)) for it, o in zip(items, outputs)]
    # tp = 1 + 0 + 2, fp = 1, fn = 1 + 1: P = 3/4, R = 3/5
    (row,) = sc.aggregate(records)
    assert row["metric"] == "micro_f1" and row["unparsed"] == 1 and row["n"] == 3
    assert row["precision"] == pytest.approx(0.75) and row["recall"] == pytest.approx(0.6)
    assert row["score"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert row["exact_set"] == pytest.approx(1 / 3)
    # F1 is not a mean: its stderr is a seeded bootstrap, which the spread of F1 over resampled items bounds.
    assert row["stderr"] == sc.bootstrap_f1_stderr(records) and 0.05 < row["stderr"] < 0.5


def test_aggregate_rows_and_table():
    def rec(file, type_, scorer, score, parsed=True, kind="mcq"):
        return {"file": file, "type": type_, "scorer": scorer, "kind": kind, "score": score, "parsed": parsed}

    records = [rec("a.jsonl", "单项选择题", "generate", 1.0), rec("a.jsonl", "多项选择题", "generate", 0.0, False),
               rec("a.jsonl", "多项选择题", "generate", 1.0), rec("b.jsonl", "mcq", "generate", 0.0)]
    rows = sc.aggregate(records)
    got = {(r["file"], r["type"]): (r["n"], r["score"], r["unparsed"]) for r in rows}
    assert got == {("a.jsonl", "all"): (3, pytest.approx(2 / 3), 1), ("a.jsonl", "单项选择题"): (1, 1.0, 0),
                   ("a.jsonl", "多项选择题"): (2, 0.5, 1), ("b.jsonl", "all"): (1, 0.0, 0),
                   ("ALL", "mean over files"): (4, pytest.approx(1 / 3), 1)}
    # Standard errors by hand: scores 1, 0, 1 have sample variance 1/3, so stderr sqrt(1/3 / 3) = 1/3; one
    # item has none; the mean over files has none when one of its files has none.
    stderr = {(r["file"], r["type"]): r["stderr"] for r in rows}
    assert stderr == {("a.jsonl", "all"): pytest.approx(1 / 3), ("a.jsonl", "单项选择题"): None,
                      ("a.jsonl", "多项选择题"): pytest.approx(0.5), ("b.jsonl", "all"): None,
                      ("ALL", "mean over files"): None}
    table = sc.markdown_table(rows).splitlines()
    assert table[2] == "| a.jsonl | all | generate | accuracy | 3 | 66.67 ± 33.33 | 1 |"
    assert table[3] == "|  | 单项选择题 | generate | accuracy | 1 | 100.00 | 0 |"
    two = sc.aggregate(records + [rec("b.jsonl", "mcq", "generate", 1.0)])
    # Independent files: the stderr of their unweighted mean is sqrt(se_a^2 + se_b^2) / 2.
    assert two[-1]["stderr"] == pytest.approx(((1 / 3) ** 2 + 0.5 ** 2) ** 0.5 / 2)


# ----- benchmark formats ------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_common_mcq_formats(tmp_path):
    medqa = write_jsonl(tmp_path / "medqa.jsonl", [
        {"question": "Drug of choice?", "answer": "Aspirin", "answer_idx": "C",
         "options": {"A": "Heparin", "B": "Warfarin", "C": "Aspirin", "D": "Ibuprofen"}, "meta_info": "step1"},
        {"question": "Which?", "answer": "ACE inhibitor", "options": {"A": "x", "B": "y", "C": "ACE inhibitor"}},
    ])
    items, _ = bm.load_benchmark(medqa)
    assert [it.gold for it in items] == [["C"], ["C"]] and items[0].type == "mcq-single"
    assert "C. Aspirin" in items[0].messages[0]["content"] and "The answer is X" in items[0].messages[0]["content"]

    medmcqa = write_jsonl(tmp_path / "medmcqa.jsonl", [  # the original release: cop 1..4
        {"id": "q1", "question": "a?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 4,
         "choice_type": "single"},
        {"id": "q2", "question": "b?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1,
         "choice_type": "multi"},
    ])
    items, _ = bm.load_benchmark(medmcqa)
    assert [it.gold for it in items] == [["D"], ["A"]] and items[1].id == "q2"
    assert not items[1].multi  # MedMCQA "multi" means a multi-statement stem, one right option
    with pytest.raises(BenchmarkError, match=r"medmcqa\.jsonl:1: field 'cop': answer index 4 out of range"):
        bm.load_benchmark(medmcqa, index_base=0)

    cmb = write_jsonl(tmp_path / "cmb.jsonl", [
        {"exam_type": "医师考试", "question": "以下哪些是高血压的危险因素？", "answer": "AB", "question_type": "多项选择题",
         "option": {"A": "吸烟", "B": "肥胖", "C": "运动", "D": "", "E": ""}},
        {"question": "下列哪项正确？", "answer": "C", "question_type": "多项选择题",
         "option": {"A": "甲", "B": "乙", "C": "丙"}},
    ])
    items, _ = bm.load_benchmark(cmb)
    assert items[0].gold == ["A", "B"] and items[0].multi and [l for l, _ in items[0].options] == ["A", "B", "C"]
    assert items[1].multi and items[1].gold == ["C"]  # the type says multi even with one right option
    assert items[0].lang == "zh" and "答案为XY" in items[0].messages[0]["content"]

    cmexam = write_jsonl(tmp_path / "cmexam.jsonl", [
        {"Question": "首选药物是", "Options": "A 阿司匹林\nB 肝素\nC 华法林", "Answer": "A,C", "Explanation": ""}])
    (it,) = bm.load_benchmark(cmexam)[0]
    assert it.options == [("A", "阿司匹林"), ("B", "肝素"), ("C", "华法林")] and it.gold == ["A", "C"]

    ceval = tmp_path / "ceval.json"  # a JSON list: each row's line is where it starts
    ceval.write_text('[\n  {"question": "q1", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "B"},\n'
                     '  {"question": "q2", "choices": ["a", "b", "c"], "answer": 0}\n]\n', encoding="utf-8")
    items, _ = bm.load_benchmark(ceval)
    assert [(it.line, it.gold) for it in items] == [(2, ["B"]), (3, ["A"])]

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"query": "q", "choices": ["x", "y"], "label": [0, 1]}]}))
    (it,) = bm.load_benchmark(wrapped)[0]
    assert it.gold == ["A", "B"] and it.multi and it.type == "mcq-multi"


def test_generation_rows_and_kinds(tmp_path):
    path = write_jsonl(tmp_path / "cblue.jsonl", [
        {"instruction": "找出疾病实体", "input": "患者有高血压和糖尿病", "output": ["高血压", "糖尿病"], "type": "CMeEE"},
        {"text": "头痛三天", "normalized_result": "头痛##偏头痛", "task": "CHIP-CDN"},
        {"conversations": [{"from": "human", "value": "写一段病历摘要"}, {"from": "gpt", "value": "患者男，45岁"}]},
        {"messages": [{"role": "user", "content": "Normalize...\nDiagnosis: dm2"},
                      {"role": "assistant", "content": "{}"}], "task": "cdn", "code": "E11.9",
         "gold": {"code": "E11.9", "term": "Type 2 diabetes mellitus without complications"}},
    ])
    a, b, c, d = bm.load_benchmark(path)[0]
    assert (a.kind, a.type, a.gold) == ("set", "CMeEE", ["糖尿病", "高血压"])
    assert a.messages == [{"role": "user", "content": "找出疾病实体\n患者有高血压和糖尿病"}]
    assert (b.kind, b.gold, b.messages[0]["content"]) == ("set", ["偏头痛", "头痛"], "头痛三天")
    assert (c.kind, c.gold, len(c.messages)) == ("text", "患者男，45岁", 1)
    assert (d.kind, d.extractor, d.gold) == ("exact", "stage2_code", "E11.9")
    assert sc.score_generation(d, '{"code": "E11.9", "term": "whatever"}')["score"] == 1.0
    assert sc.score_generation(d, '{"code": "E11.8"}')["score"] == 0.0
    assert not sc.score_generation(d, "E11.9")["parsed"]


@pytest.mark.parametrize("row,message", [
    ({"question": "q", "options": {"A": "x", "B": "y"}}, r"bad\.jsonl:2: no answer field"),
    ({"question": "q", "options": {"A": "x", "B": "y"}, "answer": "E"},
     r"bad\.jsonl:2: field 'answer': answer 'E' is neither option letter"),
    ({"question": "q", "options": ["only one"], "answer": "A"}, r"bad\.jsonl:2: field 'options': fewer than two"),
    ({"options": {"A": "x", "B": "y"}, "answer": "A"}, r"bad\.jsonl:2: no question field"),
    ({"question": "q", "choices": ["x", "y"], "answer": 5}, r"bad\.jsonl:2: field 'answer': answer index 5"),
    ({"question": "q"}, r"bad\.jsonl:2: no gold answer"),
    ({"question": "q", "answer": {"x": 1}}, r"bad\.jsonl:2: field 'answer': a text gold answer must be a string"),
])
def test_unreadable_rows_name_file_line_field(tmp_path, row, message):
    good = {"question": "fine", "options": {"A": "x", "B": "y"}, "answer": "A"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(BenchmarkError, match=message):
        bm.load_benchmark(path)
    items, skipped = bm.load_benchmark(path, on_bad_row="skip")
    assert len(items) == 1 and skipped[0][0] == 2


def test_invalid_json_is_located(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"question": "q", "options": ["x", "y"], "answer": "A"}\n\n{"question": oops}\n')
    with pytest.raises(BenchmarkError, match=r"b\.jsonl:3: invalid JSON"):
        bm.load_benchmark(path)


# ----- the model side on a tiny random Qwen2 ----------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A demo-shaped run: demo_assets (data + tokenizer), merged_base/ and stage2/adapters/ of a tiny model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medcare_dist.method.adapter_io import save_adapters
    from medcare_dist.demo.assets import prepare_demo
    from medcare_dist.method.injection import (add_stage1_adapters, add_stage2_adapters, merge_attention_lora,
                                        remove_adapters)
    from test_adapters import adapter_cfg, randomise_B

    run = tmp_path_factory.mktemp("run")
    assets = prepare_demo(run / "demo_assets")
    tok = assets.tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=assets.config.vocab_size, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    add_stage1_adapters(model, adapter_cfg())
    randomise_B(model)
    merge_attention_lora(model)
    add_stage2_adapters(model, adapter_cfg())
    randomise_B(model)
    save_adapters(model, run / "stage2" / "adapters")
    remove_adapters(model).save_pretrained(run / "merged_base")
    tok.save_pretrained(run / "merged_base")
    return run


@pytest.fixture(scope="module")
def model_and_tok(run_dir):
    model, tok, device = ev.load_model(run_dir / "merged_base", run_dir / "stage2" / "adapters")
    return model, tok


def independent_loglik(model, tok, context, continuation):
    """Sum of log p(continuation | context) from one unpadded forward, float64 log-softmax, with lm-eval's
    split: trailing context whitespace moves to the continuation, the whole is encoded, and the
    continuation is what follows the context's own encoding."""
    stripped = context.rstrip()
    whole = tok(stripped + context[len(stripped):] + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(stripped, add_special_tokens=False)["input_ids"])
    ctx, cont = whole[:n_ctx], whole[n_ctx:]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)), len(cont)


def test_loglik_scorer_matches_per_option_computation(model_and_tok):
    model, tok = model_and_tok
    items = [
        Item("f", 1, "mcq", "t", [{"role": "user", "content": "Which ICD-10-CM code is hypertension?\nA. I10\nB. E11.9"}],
             ["A"], options=[("A", "I10"), ("B", "E11.9"), ("C", "Essential (primary) hypertension"), ("D", "J45")]),
        Item("f", 2, "mcq", "t", [{"role": "user", "content": "Pick all that apply."}], ["A", "C"],
             options=[("A", "diabetes"), ("B", "heart failure with reduced ejection fraction"), ("C", "asthma")],
             multi=True),
        Item("f", 3, "mcq", "t", [{"role": "user", "content": "以下哪项是高血压？"}], ["B"],
             options=[("A", "糖尿病"), ("B", "高血压")], lang="zh"),
    ]
    for i, it in enumerate(items):
        it.index = i
    for target in ("option", "letter"):
        settings = EvalSettings(scorer="loglik", batch_size=3, loglik_target=target)  # batches mix lengths
        records = ev.evaluate_items(model, tok, items, settings)
        assert [r["scorer"] for r in records] == ["loglik"] * 3
        for it, rec in zip(items, records):
            expected = {}
            for (letter, _), (ctx, cont) in zip(it.options, ev.mcq_requests(tok, it, None, target)):
                total, n = independent_loglik(model, tok, ctx, cont)
                expected[letter] = total / n
            assert rec["option_scores"].keys() == expected.keys()
            for letter in expected:
                assert rec["option_scores"][letter] == pytest.approx(expected[letter], abs=1e-4)
            assert rec["pred"] == sc.select_options(expected, it.multi)
            assert rec["score"] == float(rec["pred"] == it.gold)
    ctx, cont = ev.mcq_requests(tok, items[0], None, "option")[2]
    assert ctx.endswith("<|im_start|>assistant\nThe answer is ") and cont == "C. Essential (primary) hypertension"
    assert ev.mcq_requests(tok, items[2], None, "option")[0][0].endswith("答案为")


def test_sum_and_char_normalization_are_lm_evals_acc_and_acc_norm(model_and_tok):
    # lm-eval: acc = argmax of the summed log-likelihoods; acc_norm = argmax of the sums over len(choice) in
    # characters. Options of very different lengths make the three rankings disagree.
    model, tok = model_and_tok
    it = Item("f", 1, "mcq", "t", [{"role": "user", "content": "Which code is asthma?"}], ["B"],
              options=[("A", "J45"), ("B", "Asthma, unspecified, uncomplicated, in an adult patient"),
                       ("C", "I10"), ("D", "Type 2 diabetes mellitus without complications")])
    it.index = 0
    sums = {}
    for (letter, _), (ctx, cont) in zip(it.options, ev.mcq_requests(tok, it, None, "option")):
        total, n = independent_loglik(model, tok, ctx, cont)
        sums[letter] = (total, n, len(cont))
    want = {"sum": max(sums, key=lambda l: sums[l][0]), "char": max(sums, key=lambda l: sums[l][0] / sums[l][2]),
            "token": max(sums, key=lambda l: sums[l][0] / sums[l][1])}
    for how in ("token", "sum", "char"):
        rec = ev.evaluate_items(model, tok, [it], EvalSettings(scorer="loglik", normalization=how))[0]
        assert rec["pred"] == [want[how]] and rec["normalization"] == how
        for letter, (total, n, chars) in sums.items():
            got = rec["option_logliks"][letter]
            assert got["sum"] == pytest.approx(total, abs=1e-4) and got["tokens"] == n and got["chars"] == chars


def test_the_option_separator_follows_lm_eval_except_after_cjk():
    assert ev.option_separator("Answer:") == " "          # was "" (only letters and digits got a space)
    assert ev.option_separator("The answer is ") == ""     # the space is already there
    assert ev.option_separator("答案为") == "" and ev.option_separator("答案：") == ""
    assert ev.option_separator("(") == " " and ev.option_separator("") == ""


def test_the_continuation_is_split_from_the_whole_encoding(model_and_tok):
    _, tok = model_and_tok
    for context, continuation in (("The answer is ", "B. I10"), ("Answer:", " A"), ("x" * 3, "yy")):
        ctx, cont = ev.split_encoding(tok, context, continuation)
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        assert ctx + cont == whole                         # the canonical tokenisation, whatever the merges
        assert ctx == tok(context.rstrip(), add_special_tokens=False)["input_ids"][:len(ctx)]


def test_generation_stops_at_im_end(model_and_tok):
    """The model config's eos is <|endoftext|>; generation must still stop at <|im_end|>."""
    import copy

    model, tok = model_and_tok
    model = copy.deepcopy(model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id != im_end
    assert im_end in ev.stop_token_ids(tok, model)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[im_end] = 10.0  # every step's argmax is <|im_end|>
    model.lm_head = head
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    prompts = [ev.render_prompt(tok, [{"role": "user", "content": "hello"}])] * 2
    assert ev.generate(model, tok, prompts, max_new_tokens=6, batch_size=2) == ["", ""]
    assert len(calls) == 1  # one step, not six


def test_demo_run_end_to_end(run_dir, capsys):
    out = run_dir / "eval_out"
    result = ev.run_cli(["--demo", str(run_dir), "--limit", "6", "--max-new-tokens", "3", "--batch-size", "4",
                      "--output", str(out), "--quiet"])
    assert result["adapters"].endswith("adapters") and result["world_size"] == 1
    saved = json.loads((out / "results.json").read_text())
    rows = {(r["file"].rsplit("/", 1)[1], r["type"], r["scorer"]): r for r in saved["results"]}
    stage1, stage2 = "stage1_eval.jsonl", "stage2_eval.jsonl"
    assert rows[(stage2, "all", "generate")]["metric"] == "accuracy"
    assert rows[(stage2, "all", "generate")]["n"] == 6
    assert rows[(stage1, "all", "generate")]["n"] == 6
    records = [json.loads(l) for l in (out / "items.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} <= {"mcq", "desc_to_code", "code_to_desc", "cdn"}
    for (f, t, s), row in rows.items():
        mine = [r for r in records if r["file"].endswith(f) and r["scorer"] == s and t in ("all", r["type"])]
        assert row["n"] == len(mine) and row["unparsed"] == sum(not r["parsed"] for r in mine)
    table = (out / "results.md").read_text()
    assert table.startswith("| file | type | scorer |") and "stage2_eval.jsonl" in table
    assert "| unparsed |" in capsys.readouterr().out


def test_fewshot_cli_scores_the_prompt_with_its_examples_and_writes_the_lm_eval_section(run_dir, model_and_tok,
                                                                                        tmp_path):
    model, tok = model_and_tok
    bench = write_jsonl(tmp_path / "medqa.jsonl", [
        {"question": f"Which code is condition {i}?", "options": {"A": f"I1{i}", "B": f"E1{i}.9"},
         "answer_idx": "AB"[i % 2]} for i in range(6)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [
        {"question": f"Dev question {i}?", "options": {"A": "J45", "B": "I10"}, "answer_idx": "B"} for i in range(4)])
    out = tmp_path / "out"
    result = ev.run_cli([str(bench), "--model", str(run_dir / "merged_base"), "--adapters",
                         str(run_dir / "stage2" / "adapters"), "--scorer", "loglik", "--num-fewshot", "2",
                         "--fewshot-file", str(dev), "--output", str(out), "--quiet", "--normalization", "sum"])
    records = [json.loads(l) for l in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["fewshot"]) == 2 and all(o.startswith(str(dev)) for o in r["fewshot"])
                                     for r in records)
    # Rebuild the first item's context by hand from the recorded examples and score it independently.
    rec = records[0]
    turns = []
    for origin in rec["fewshot"]:
        i = int(origin.rsplit(":", 1)[1]) - 1
        turns += [{"role": "user", "content": f"Dev question {i}?\nA. J45\nB. I10\n"
                                              + bm.INSTRUCTIONS[("en", False)]},
                  {"role": "assistant", "content": "The answer is B. I10"}]
    turns.append({"role": "user", "content": "Which code is condition 0?\nA. I10\nB. E10.9\n"
                                             + bm.INSTRUCTIONS[("en", False)]})
    context = ev.render_prompt(tok, turns) + "The answer is "
    for letter, text in (("A", "I10"), ("B", "E10.9")):
        total, n = independent_loglik(model, tok, context, f"{letter}. {text}")
        assert rec["option_logliks"][letter]["sum"] == pytest.approx(total, abs=1e-4)
        assert rec["option_logliks"][letter]["tokens"] == n
    lm = json.loads((out / "results.json").read_text())["lm_eval"]
    acc = [float(max(r["option_logliks"], key=lambda l: r["option_logliks"][l]["sum"]) == r["gold"][0])
           for r in records]
    assert lm["results"]["medqa"]["acc,none"] == pytest.approx(sum(acc) / 6) == result["results"][0]["score"]
    assert lm["n-shot"] == {"medqa": 2} and lm["n-samples"]["medqa"] == {"original": 6, "effective": 6}
    saved = json.loads((out / "results.json").read_text())["settings"]
    assert saved["num_fewshot"] == 2 and saved["fewshot_seed"] == 1234


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "options": ["a", "b"], "answer": "Z"}])
    with pytest.raises(SystemExit):
        ev.main(["--model", str(tmp_path), str(bad)])
    assert "x.jsonl:1: field 'answer'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--demo", str(tmp_path)])
    assert "not a demo run directory" in capsys.readouterr().err


def _rank_main(rank, world, port, run_dir, bench, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok, device = ev.load_model(run_dir / "merged_base", run_dir / "stage2" / "adapters")
        r, w = ev.setup_distributed()
        assert (r, w) == (rank, world)
        res = ev.run_eval(model, tok, [bench], EvalSettings(max_new_tokens=2, batch_size=2), out, rank=r, world=w,
                          show_progress=False)
        assert (res is None) == (rank != 0)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one(run_dir, tmp_path):
    """Items sharded over 2 gloo ranks and gathered on rank 0 give the single-process records."""
    import socket

    import torch.multiprocessing as mp

    rows = [{"question": f"Question {i}?", "options": {"A": "I10", "B": "E11.9", "C": "J45"},
             "answer": "AB" if i % 3 == 0 else "C"} for i in range(7)]
    rows.append({"messages": [{"role": "user", "content": "Describe ICD-10-CM code I10."}], "gold": "hypertension"})
    bench = write_jsonl(tmp_path / "b.jsonl", rows)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (a spawned interpreter spends seconds importing)
    mp.start_processes(_rank_main, args=(2, port, run_dir, bench, tmp_path / "two"), nprocs=2, start_method="fork")
    model, tok, _ = ev.load_model(run_dir / "merged_base", run_dir / "stage2" / "adapters")
    one = ev.run_eval(model, tok, [bench], EvalSettings(max_new_tokens=2, batch_size=2), tmp_path / "one",
                      show_progress=False)
    two = [json.loads(l) for l in (tmp_path / "two" / "items.jsonl").read_text().splitlines()]
    assert len(two) == len(one["records"]) == 8 * 2 - 1
    for a, b in zip(one["records"], two):
        noisy = ("option_scores", "option_logliks")  # batch composition moves the last float32 digits
        assert {k: v for k, v in a.items() if k not in noisy} == {k: v for k, v in b.items() if k not in noisy}
        for letter, v in a.get("option_logliks", {}).items():
            assert math.isclose(v["sum"], b["option_logliks"][letter]["sum"], abs_tol=1e-4)
            assert (v["tokens"], v["chars"]) == (b["option_logliks"][letter]["tokens"],
                                                 b["option_logliks"][letter]["chars"])
        for letter, v in a.get("option_scores", {}).items():
            assert math.isclose(v, b["option_scores"][letter], abs_tol=1e-4)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2
