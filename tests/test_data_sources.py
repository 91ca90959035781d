"""Data sources beyond single JSON files (folders, arrow, csv, save_to_disk), column mapping, mixing weights,
the sharegpt name, list-of-parts content and tool calls (rendered through the template, masked correctly)."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from medcare_dist.data.conversations import (
    IGNORE_INDEX, DataError, read_conversations, read_stage_conversations, render_segments, tokenize_conversation,
)
from medcare_dist.data.token_cache import cache_key
from medcare_dist.demo.assets import build_demo_tokenizer

# A table in a non-standard layout: the column mapping turns it into alpaca rows.
ROWS = [{"q": f"What is code E11.{i}?", "a": f"E11.{i} is a type 2 diabetes code.", "n": i} for i in range(6)]
COLUMNS = {"instruction": "q", "output": "a"}

# ChatML with tool schemas, tool calls and tool results, in the layout Qwen2.5's template uses (written here,
# so the test does not depend on a downloaded tokenizer).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}\n\n"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "icd_lookup", "description": "Look up an ICD-10-CM code",
                                           "parameters": {"type": "object",
                                                          "properties": {"code": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}]}) for r in ROWS * 5))
    return build_demo_tokenizer(root / "tokenizer", [corpus], vocab_size=400)


@pytest.fixture
def tool_tok(tok):
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _expected(rows):
    return [[{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}] for r in rows]


def _write_arrow(path, table, stream: bool):
    with pa.OSFile(str(path), "wb") as f:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(f, table.schema)
        writer.write_table(table)
        writer.close()


def test_every_source_kind_reads_the_same_rows(tmp_path):
    import datasets

    table = pa.Table.from_pylist(ROWS)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    pq.write_table(pa.Table.from_pylist(ROWS[2:4]), folder / "b.parquet")
    pcsv.write_csv(pa.Table.from_pylist(ROWS[4:]), folder / "sub" / "c.csv")
    (folder / ".hidden.jsonl").write_text("not json\n")  # hidden files are not data
    pcsv.write_csv(table, tmp_path / "t.csv")
    _write_arrow(tmp_path / "file.arrow", table, stream=False)
    _write_arrow(tmp_path / "stream.arrow", table, stream=True)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    for source, split in [("folder", None), ("t.csv", None), ("file.arrow", None), ("stream.arrow", None),
                          ("ds", None), ("dd", "train")]:
        good, bad, n = read_conversations(tmp_path / source, columns=COLUMNS, split=split)
        assert (good, bad, n) == (_expected(ROWS), [], len(ROWS)), source
    good, _, _ = read_conversations(tmp_path / "dd", columns=COLUMNS, split="test")
    assert good == _expected(ROWS[:1])


def test_source_errors_name_the_source_and_what_to_do(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits \['train', 'test'\]; name one"):
        read_conversations(tmp_path / "dd", columns=COLUMNS)
    with pytest.raises(DataError, match=r"dd: no split 'validation'"):
        read_conversations(tmp_path / "dd", columns=COLUMNS, split="validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder with no data files"):
        read_conversations(tmp_path / "empty")
    (tmp_path / "x.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"x.arrow: not a readable Arrow IPC file or stream"):
        read_conversations(tmp_path / "x.arrow")
    (tmp_path / "r.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match="'split' is for datasets saved with save_to_disk"):
        read_conversations(tmp_path / "r.jsonl", split="train")
    # A mapped column the row lacks is a bad row with its place, not a crash.
    _, bad, _ = read_conversations(tmp_path / "r.jsonl", columns={"instruction": "question", "output": "a"})
    assert [str(b) for b in bad] == [f"{tmp_path / 'r.jsonl'}:1: missing_column: no column 'question' (from the "
                                     "source's 'columns' mapping; columns: a, n, q)"]


def test_bad_rows_in_a_folder_name_the_file_inside_it(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    pq.write_table(pa.Table.from_pylist([ROWS[1], {**ROWS[2], "a": ""}]), tmp_path / "d" / "b.parquet")
    good, bad, n = read_conversations(tmp_path / "d", columns=COLUMNS)
    assert n == 3 and len(good) == 2
    assert [str(b) for b in bad] == [f"{tmp_path / 'd' / 'b.parquet'}: row 2: empty_content: message 2 "
                                     "(assistant) is empty"]


def test_weights_mix_sources_in_the_given_ratios_seeded(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({**r, "q": "A " + r["q"]}) + "\n" for r in ROWS * 10))  # 60 rows
    b.write_text("".join(json.dumps({**r, "q": "B " + r["q"]}) + "\n" for r in ROWS * 5))   # 30 rows
    sources = [{"path": str(a), "columns": COLUMNS, "weight": 0.5},
               {"path": str(b), "columns": COLUMNS, "weight": 2.5}]
    conv, stats = read_stage_conversations(sources, 64, seed=3)
    counts = Counter(m[0]["content"][0] for _, m in conv)
    assert counts == {"A": 30, "B": 75}
    assert stats.files[str(a)] == {"read": 60, "bad": 0, "used": 30, "rows": 0, "weight": 0.5}
    assert stats.files[str(b)]["used"] == 75
    # Whole copies keep every row; the share beyond them is a seeded subset without repeats.
    b_rows = [m[0]["content"] for p, m in conv if p == str(b)]
    assert b_rows[:60] == [("B " + r["q"]) for r in ROWS * 5] * 2
    assert len(b_rows[60:]) == 15
    again, _ = read_stage_conversations(sources, 64, seed=3)
    other, _ = read_stage_conversations(sources, 64, seed=4)
    assert again == conv and other != conv
    with pytest.raises(DataError, match="weight must be a positive number"):
        read_stage_conversations([{"path": str(a), "weight": 0}], 64)


def test_settings_of_a_source_are_part_of_the_token_cache_key(tok, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = {"path": str(src), "columns": COLUMNS}
    keys = {cache_key([base | change], tok, 64, "error", 0)
            for change in ({}, {"weight": 2.0}, {"columns": {"instruction": "a", "output": "q"}})}
    assert len(keys) == 3
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "x.jsonl").write_text(src.read_text())
    before = cache_key([{"path": str(folder), "columns": COLUMNS}], tok, 64, "error", 0)
    (folder / "y.jsonl").write_text(src.read_text())  # a file added to a folder source is new data
    assert cache_key([{"path": str(folder), "columns": COLUMNS}], tok, 64, "error", 0) != before


def test_sharegpt_is_the_conversations_format_and_parts_are_text(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "Code for I10?"}, {"from": "gpt", "value": "I10."}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Code for "},
                                                       {"type": "text", "text": "I10?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "I10."}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "I10."}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (conv, parts, image)) + "\n")
    good, bad, _ = read_conversations(path, "sharegpt")
    assert len(good) == 1 and {b.reason for b in bad} == {"missing_field"}
    good, bad, _ = read_conversations(path)
    assert good[0] == good[1] == [{"role": "user", "content": "Code for I10?"}, {"role": "assistant", "content": "I10."}]
    assert [(b.line, b.reason) for b in bad] == [(3, "unsupported_content")]


def _tool_rows():
    call = {"name": "icd_lookup", "arguments": {"code": "I10"}}
    sharegpt = {"conversations": [
        {"from": "human", "value": "What is I10?"},
        {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "I10: Essential (primary) hypertension"},
        {"from": "gpt", "value": "I10 is essential hypertension."}], "tools": json.dumps(TOOLS)}
    openai = {"messages": [
        {"role": "user", "content": "What is I10?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "icd_lookup", "arguments": '{"code": "I10"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "I10: Essential (primary) hypertension"},
        {"role": "assistant", "content": "I10 is essential hypertension."}], "tools": TOOLS}
    return sharegpt, openai


def test_tool_calls_are_trained_and_tool_results_are_not(tool_tok, tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _tool_rows()) + "\n")
    (sharegpt, openai), bad, _ = read_conversations(path)
    assert bad == [] and sharegpt.tools == openai.tools == TOOLS
    a, b = (tokenize_conversation(tool_tok, c, 4096) for c in (sharegpt, openai))
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]  # the two layouts are one conversation
    rendered = tool_tok.apply_chat_template(list(openai), tools=TOOLS, tokenize=False)
    assert tool_tok.decode(a["input_ids"]) == rendered
    # The labelled tokens, decoded span by span, are exactly the two assistant turns with their end marker.
    spans, current = [], []
    for t, l in zip(a["input_ids"], a["labels"]):
        if l != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(tool_tok.decode(current))
            current = []
    spans += [tool_tok.decode(current)] if current else []
    assert spans == ['<tool_call>\n{"name": "icd_lookup", "arguments": {"code": "I10"}}\n</tool_call><|im_end|>',
                     "I10 is essential hypertension.<|im_end|>"]
    assert "icd_lookup" in rendered.split("<|im_start|>user")[0]  # the schemas reach the system prompt


def test_a_template_that_would_drop_tool_calls_is_refused(tok):
    sharegpt, _ = _tool_rows()
    from medcare_dist.data.conversations import normalize_row

    conv = normalize_row(sharegpt)
    with pytest.raises(DataError, match="ignores 'tools'"):
        render_segments(tok, conv)
    conv.tools = None
    with pytest.raises(DataError, match="does not render assistant tool_calls"):
        render_segments(tok, conv)


def test_malformed_tool_calls_are_bad_rows(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{not json"},
                           {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "[oops"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    good, bad, _ = read_conversations(path)
    assert good == []
    assert [(b.line, b.reason) for b in bad] == [(1, "bad_tool_call"), (2, "bad_tool_call"), (3, "wrong_type"),
                                                 (4, "bad_tools")]


def test_check_cli_reads_folders_splits_and_mapped_columns(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    run = subprocess.run([sys.executable, "-m", "medcare_dist.data", "check", str(tmp_path / "dd"), "--split",
                          "train", "--column", "instruction=q", "--column", "output=a"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{tmp_path / 'dd'}: 6 rows, 6 valid, 0 bad" in run.stdout
    run = subprocess.run([sys.executable, "-m", "medcare_dist.data", "check", str(tmp_path / "dd"), "--split",
                          "train"], capture_output=True, text=True)
    assert run.returncode == 1 and "unknown_format" in run.stdout


def test_recipe_source_keys_are_read_and_checked(tmp_path):
    from medcare_dist.config import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  stage1:\n    - path: /d/pubmed_qa\n      split: train\n      format: ShareGPT\n"
                      "      columns: {conversations: dialog, system: sys}\n      weight: 0.25\n"
                      "    - /d/notes.jsonl\n")
    src, plain = load_config(str(recipe)).data.stage1
    assert (src.path, src.split, src.format, src.columns, src.weight) == (
        "/d/pubmed_qa", "train", "sharegpt", {"conversations": "dialog", "system": "sys"}, 0.25)
    assert (plain.split, plain.columns, plain.weight) == (None, {}, 1.0)
    for body, message in [("weight: 0", "r.yaml, line 4: data.stage1[0].weight: must be > 0, got 0.0"),
                          ("columns: [a, b]", "r.yaml, line 4: data.stage1[0].columns: expected a mapping, got a list"),
                          ("mix: 2", "r.yaml, line 4: data.stage1[0].mix: unknown key")]:
        recipe.write_text(f"data:\n  stage1:\n    - path: /d/x.jsonl\n      {body}\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(recipe))
        assert message in str(e.value), str(e.value)
