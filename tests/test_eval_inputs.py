"""Benchmark sources beyond JSON (parquet with datasets metadata, arrow, csv, save_to_disk, folders), the
MedMCQA answer-index rule, few-shot prompts and the lm-eval-shaped results section."""

import json
import logging
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from medcare_dist.eval import benchmarks as bm
from medcare_dist.eval import scoring as sc
from medcare_dist.eval.benchmarks import BenchmarkError, Item
from medcare_dist.eval.fewshot import add_fewshot

MEDMCQA = [{"id": f"m{i}", "question": f"Question {i}?", "opa": "w", "opb": "x", "opc": "y", "opd": "z",
            "cop": c, "choice_type": "single"} for i, c in enumerate([1, 2, 3, 2])]


def _hub_medmcqa(rows):
    """MedMCQA as the Hub publishes it: cop a ClassLabel (a..d, 0-based), -1 in the unlabelled test split."""
    import datasets

    features = datasets.Features({k: datasets.Value("string") for k in ("id", "question", "opa", "opb", "opc",
                                                                        "opd", "choice_type")}
                                 | {"cop": datasets.ClassLabel(names=list("abcd"))})
    return datasets.Dataset.from_list(rows, features=features)


def _letters(items):
    return [it.gold for it in items]


def test_medmcqa_json_reads_cop_one_based_even_without_a_4(tmp_path, caplog):
    path = tmp_path / "medmcqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MEDMCQA))
    with caplog.at_level(logging.WARNING):
        items, _ = bm.load_benchmark(path)
    assert _letters(items) == [["A"], ["B"], ["C"], ["B"]]  # cop 1..4 of the original release
    assert "MedMCQA-shaped rows, cop never 0: reading cop as 1-based" in caplog.text
    zero = tmp_path / "export.jsonl"  # a 0-based export: a 0 shows it
    zero.write_text("".join(json.dumps({**r, "cop": r["cop"] - 1}) + "\n" for r in MEDMCQA))
    assert _letters(bm.load_benchmark(zero)[0]) == [["A"], ["B"], ["C"], ["B"]]
    assert _letters(bm.load_benchmark(path, index_base=0)[0]) == [["B"], ["C"], ["D"], ["C"]]


def test_hub_parquet_arrow_and_save_to_disk_read_cop_through_its_class_label(tmp_path):
    import datasets

    rows = [{**r, "cop": r["cop"]} for r in MEDMCQA]  # 1, 2, 3, 2 as ClassLabel indices: b, c, d, c
    ds = _hub_medmcqa(rows)
    ds.to_parquet(str(tmp_path / "validation.parquet"))
    datasets.DatasetDict({"validation": ds, "test": _hub_medmcqa([{**MEDMCQA[0], "cop": -1}])}).save_to_disk(
        str(tmp_path / "saved"))
    want = [["B"], ["C"], ["D"], ["C"]]
    assert _letters(bm.load_benchmark(tmp_path / "validation.parquet")[0]) == want
    arrow = next((tmp_path / "saved" / "validation").glob("*.arrow"))
    assert _letters(bm.load_benchmark(arrow)[0]) == want
    items, _ = bm.load_benchmark(tmp_path / "saved", split="validation")
    assert _letters(items) == want and items[0].file == f"{tmp_path / 'saved'}[validation]"
    with pytest.raises(BenchmarkError, match=r"saved\[test\]: row 1: field 'cop': answer -1 marks an unlabelled row"):
        bm.load_benchmark(tmp_path / "saved", split="test")
    with pytest.raises(BenchmarkError, match=r"a DatasetDict with splits \['validation', 'test'\]"):
        bm.load_benchmark(tmp_path / "saved")


def test_csv_and_folders_and_bad_table_rows_are_named(tmp_path):
    table = pa.Table.from_pylist([{"question": "q1?", "A": "yes", "B": "no", "answer": "A"},
                                  {"question": "q2?", "A": "yes", "B": "no", "answer": "B"}])
    pcsv.write_csv(table, tmp_path / "cmmlu.csv")
    assert _letters(bm.load_benchmark(tmp_path / "cmmlu.csv")[0]) == [["A"], ["B"]]
    folder = tmp_path / "medqa"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": "a?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"}]),
                   folder / "test-00000.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "b?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}]),
                   folder / "test-00001.parquet")
    with pytest.raises(BenchmarkError, match=r"test-00001.parquet: row 1: field 'answer_idx': answer 'E' is neither"):
        bm.load_benchmark(folder)
    items, skipped = bm.load_benchmark(folder, on_bad_row="skip")
    assert _letters(items) == [["B"]] and items[0].file == str(folder) and len(skipped) == 1
    assert items[0].origin == f"{folder / 'test-00000.parquet'}: row 1"


def test_the_cli_names_a_damaged_parquet_without_a_traceback(tmp_path):
    bad = tmp_path / "medqa.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    run = subprocess.run([sys.executable, "-m", "medcare_dist.eval", str(bad), "--model", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a readable parquet file")


def _mcq(line, gold, lang="en", system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"Q{line}?\nA. x{line}\nB. y{line}"}]
    return Item("b.jsonl", line, "mcq", "t", messages, [gold], options=[("A", f"x{line}"), ("B", f"y{line}")],
                lang=lang, origin=f"b.jsonl:{line}")


def test_fewshot_turns_by_hand():
    pool = [_mcq(i, "AB"[i % 2]) for i in range(1, 6)]
    item = _mcq(3, "B", system="Be brief.")
    add_fewshot([item], pool, 2, seed=7)
    shots = [int(o.split(":")[1]) for o in item.fewshot]
    assert len(shots) == 2 and 3 not in shots  # never its own example
    expected = [{"role": "system", "content": "Be brief."}]
    for s in shots:
        gold = "AB"[s % 2]
        text = {"A": f"x{s}", "B": f"y{s}"}[gold]
        expected += [{"role": "user", "content": f"Q{s}?\nA. x{s}\nB. y{s}"},
                     {"role": "assistant", "content": f"The answer is {gold}. {text}"}]
    expected.append({"role": "user", "content": "Q3?\nA. x3\nB. y3"})
    assert item.messages == expected
    # The draw depends on the seed and the item only: the same in another order, another with another seed.
    again = [_mcq(9, "A"), _mcq(3, "B", system="Be brief.")]
    add_fewshot(again, list(reversed(pool)), 2, seed=7)
    assert again[1].fewshot == item.fewshot
    seeds = set()
    for seed in range(20):
        other = _mcq(3, "B")
        add_fewshot([other], pool, 2, seed=seed)
        seeds.add(tuple(other.fewshot))
    assert len(seeds) > 3
    letter = _mcq(3, "B")
    add_fewshot([letter], pool, 1, seed=7, target="letter", answer_prefix="Answer:")
    assert letter.messages[1]["content"] in ("Answer: A", "Answer: B")
    with pytest.raises(BenchmarkError, match=r"b.jsonl:3: --num-fewshot 5, but the few-shot source has only 4"):
        add_fewshot([_mcq(3, "B")], pool, 5)


def test_lm_eval_section_by_hand():
    def rec(file, gold, sums, conts):
        return {"scorer": "loglik", "kind": "mcq", "file": file, "gold": [gold],
                "option_logliks": {l: {"sum": s, "tokens": 1, "chars": len(c)} for l, s, c in zip("ABC", sums, conts)}}

    records = [rec("data/medqa.jsonl", "A", [-3.0, -2.0, -9.0], [" A. aspirin and clopidogrel", " B. no", " C. x"]),
               rec("data/medqa.jsonl", "B", [-1.0, -2.0, -3.0], [" A. a", " B. bb", " C. ccc"]),
               rec("data/medqa.jsonl", "C", [-5.0, -4.0, -1.0], [" A. a", " B. b", " C. c"])]
    out = sc.lm_eval_section(records, {"data/medqa.jsonl": 10}, 3)
    # acc: argmax of the sums = B, A, C -> 0, 0, 1; acc_norm: sum / chars = -3/27, -2/6, -9/5 -> A;
    # -1/5, -2/6, -3/7 -> A; -5/5, -4/5, -1/5 -> C: 1, 0, 1.
    r = out["results"]["medqa"]
    assert r["acc,none"] == pytest.approx(1 / 3) and r["acc_norm,none"] == pytest.approx(2 / 3)
    assert r["acc_stderr,none"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert r["acc_norm_stderr,none"] == r["acc_stderr,none"]  # the same spread: one 0 and two 1s vs two 0s
    assert out["n-shot"] == {"medqa": 3} and out["n-samples"] == {"medqa": {"original": 10, "effective": 3}}


def test_lm_eval_section_agrees_with_lm_eval_itself():
    metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert sc.mean_stderr(values) == pytest.approx(metrics.mean_stderr(values))
