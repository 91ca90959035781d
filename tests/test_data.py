"""Data loading: the three formats, assistant-only labels, truncation, bad-row policies and the check CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medcare_dist.data.conversations import (
    IGNORE_INDEX, DataError, collate, load_stage_dataset, read_conversations, render_segments,
    tokenize_conversation,
)
from medcare_dist.demo.assets import build_demo_tokenizer

REPO = Path(__file__).resolve().parents[1]

SYSTEM = "You are a clinical coder."
TURNS = [("Code for type 2 diabetes?", "E11.9 is type 2 diabetes mellitus without complications."),
         ("And with hyperglycemia?", "That is E11.65.")]


def messages_row(system=True, turns=TURNS):
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def conversations_row(system=True, turns=TURNS):
    conv = [{"from": "system", "value": SYSTEM}] if system else []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv}


def write_jsonl(path: Path, rows) -> Path:
    """rows: dicts (serialised) or raw bytes/str lines written verbatim."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(root / "corpus.jsonl", [messages_row()] * 20 + [
        {"messages": [{"role": "user", "content": f"What is code E{i}.{j}?"},
                      {"role": "assistant", "content": f"The code is E{i}.{j}, a diabetes code."}]}
        for i in range(10, 14) for j in range(10)])
    return build_demo_tokenizer(root / "tokenizer", [corpus], vocab_size=400)


def reply_spans(ids, tok):
    """Independent expectation: after each `<|im_start|>assistant\\n` header, every token up to and
    including the next `<|im_end|>` is a reply token."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
            j = i + 1 + len(header)
            k = ids.index(end, j)
            spans.append((j, k + 1))
            i = k
        i += 1
    return spans


def test_labels_are_exactly_the_replies_multi_turn(tok):
    msgs = messages_row()["messages"]
    out = tokenize_conversation(tok, msgs, max_length=1024)
    ids, labels = out["input_ids"], out["labels"]
    assert not out["truncated"] and len(ids) == len(labels)
    spans = reply_spans(ids, tok)
    assert len(spans) == 2
    expected = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        expected[a:b] = ids[a:b]
    assert labels == expected
    # Each labelled span decodes to the assistant text followed by the end-of-turn token.
    assert [tok.decode(ids[a:b]) for a, b in spans] == [a + "<|im_end|>" for _, a in TURNS]
    # Pieces tokenised apart give the same ids as the whole rendered text (ChatML cuts at special tokens).
    whole = tok.apply_chat_template(msgs, tokenize=False)
    assert ids == tok(whole, add_special_tokens=False)["input_ids"]
    assert "".join(text for text, _ in render_segments(tok, msgs)) == whole


def test_labels_follow_a_template_with_default_system_prompt(tok):
    # Another template shape: a leading BOS and a system prompt injected when none is given.
    custom = tok.chat_template.replace(
        "{%- for message in messages -%}",
        "{{ '<|endoftext|>' }}{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\nDefault.<|im_end|>\n' }}{%- endif -%}{%- for message in messages -%}")
    original, tok.chat_template = tok.chat_template, custom
    try:
        msgs = messages_row(system=False)["messages"]
        out = tokenize_conversation(tok, msgs, 1024)
    finally:
        tok.chat_template = original
    ids = out["input_ids"]
    assert ids[0] == tok.eos_token_id and tok.decode(ids).startswith("<|endoftext|><|im_start|>system\nDefault.")
    spans = reply_spans(ids, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [a + "<|im_end|>" for _, a in TURNS]
    assert sum(t != IGNORE_INDEX for t in out["labels"]) == sum(b - a for a, b in spans)


def test_three_formats_give_identical_tokens(tok, tmp_path):
    alpaca = {"system": SYSTEM, "history": [list(TURNS[0])], "instruction": TURNS[1][0], "output": TURNS[1][1]}
    files = {
        "messages": write_jsonl(tmp_path / "m.jsonl", [messages_row()]),
        "conversations": write_jsonl(tmp_path / "c.jsonl", [conversations_row()]),
        "alpaca": write_jsonl(tmp_path / "a.jsonl", [alpaca]),
    }
    results = {}
    for fmt, path in files.items():
        for given in ("auto", fmt):
            ds, stats = load_stage_dataset([{"path": str(path), "format": given}], tok, 512)
            assert stats.num_rows == 1 and stats.bad_rows == {}
            results[(fmt, given)] = (ds[0]["input_ids"], ds[0]["labels"])
    assert len(set(map(str, results.values()))) == 1


def test_top_level_system_column(tmp_path):
    row = conversations_row(system=False)
    row["system"] = SYSTEM
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    [msgs], bad, _ = read_conversations(path)
    assert msgs == messages_row()["messages"] and bad == []


def test_alpaca_input_joins_instruction(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Normalise:", "input": "t2dm", "output": "E11.9"}])
    [msgs], bad, n = read_conversations(path)
    assert bad == [] and n == 1
    assert msgs == [{"role": "user", "content": "Normalise:\nt2dm"}, {"role": "assistant", "content": "E11.9"}]
    out = tokenize_conversation(tok, msgs, 256)
    assert tok.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == "E11.9<|im_end|>"


def test_truncation_is_right_sided_and_counted(tok, tmp_path):
    msgs = messages_row()["messages"]
    full = tokenize_conversation(tok, msgs, 10_000)
    n = len(full["input_ids"])
    cut = tokenize_conversation(tok, msgs, n - 5)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][: n - 5]
    assert cut["labels"] == full["labels"][: n - 5]
    exact = tokenize_conversation(tok, msgs, n)
    assert not exact["truncated"] and exact["input_ids"] == full["input_ids"]

    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [messages_row(), short, messages_row()])
    first_reply = reply_spans(full["input_ids"], tok)[0][0]
    ds, stats = load_stage_dataset([{"path": str(path)}], tok, n - 5)
    assert stats.num_rows == 3 and stats.num_truncated == 2 and stats.longest_sequence == n
    assert all(len(r) <= n - 5 for r in ds["input_ids"])
    # A limit that cuts before the first reply leaves nothing to learn: those rows are dropped, not truncated.
    ds, stats = load_stage_dataset([{"path": str(path)}], tok, first_reply)
    assert stats.num_rows == 1 and stats.num_dropped_no_labels == 2 and stats.num_truncated == 0


# Each bad row kind, at a known 1-based line, between valid rows.
BAD_LINES = {
    2: ("invalid_json", '{"messages": [}'),
    3: ("invalid_utf8", b'{"messages": "\xff\xfe"}'),
    4: ("not_an_object", "[1, 2]"),
    5: ("unknown_format", '{"text": "hello"}'),
    6: ("missing_field", json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]})),
    7: ("unknown_role", json.dumps({"conversations": [{"from": "bot", "value": "x"}]})),
    8: ("empty_conversation", json.dumps({"messages": []})),
    9: ("no_assistant_turn", json.dumps({"messages": [{"role": "user", "content": "hello?"}]})),
    10: ("empty_content", json.dumps({"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "  "}]})),
    11: ("wrong_type", json.dumps({"messages": "not a list"})),
    12: ("no_user_turn", json.dumps({"messages": [{"role": "assistant", "content": "hi"},
                                                  {"role": "user", "content": "q"}]})),
    13: ("missing_field", json.dumps({"instruction": "only an instruction"})),
}


@pytest.fixture
def mixed_file(tmp_path):
    lines = [messages_row()]
    for lineno in sorted(BAD_LINES):
        lines.append(BAD_LINES[lineno][1])
    lines += ["", conversations_row()]  # a blank line is skipped, not an error
    return write_jsonl(tmp_path / "mixed.jsonl", lines)


def test_error_policy_lists_every_bad_row_with_file_and_line(tok, mixed_file):
    with pytest.raises(DataError) as err:
        load_stage_dataset([{"path": str(mixed_file)}], tok, 256, on_bad_row="error")
    message = str(err.value)
    assert f"{len(BAD_LINES)} bad rows" in message
    for lineno, (reason, _) in BAD_LINES.items():
        assert f"{mixed_file}:{lineno}: {reason}:" in message
    assert f"{mixed_file}:1:" not in message and f"{mixed_file}:15:" not in message


def test_skip_policy_counts_by_reason(tok, mixed_file, tmp_path):
    clean = write_jsonl(tmp_path / "clean.jsonl", [messages_row(system=False)] * 3)
    ds, stats = load_stage_dataset([{"path": str(mixed_file)}, {"path": str(clean)}], tok, 256,
                                   on_bad_row="skip")
    expected = {}
    for reason, _ in BAD_LINES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.bad_rows == expected
    assert len(ds) == stats.num_rows == 5
    assert stats.files[str(mixed_file)] == {"read": 14, "bad": 12, "used": 2, "rows": 2, "weight": 1.0}
    assert stats.files[str(clean)]["rows"] == 3
    assert json.loads(json.dumps(stats.to_dict()))["bad_rows"] == expected


def test_error_list_is_capped(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 30)
    with pytest.raises(DataError) as err:
        load_stage_dataset([{"path": str(path)}], tok, 64)
    message = str(err.value)
    assert "30 bad rows" in message and "... and 10 more" in message
    assert f"{path}:20:" in message and f"{path}:21:" not in message


def test_missing_and_unsupported_files(tok, tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl: no such file"):
        load_stage_dataset([{"path": str(tmp_path / "nowhere.jsonl")}], tok, 64)
    (tmp_path / "data.txt").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt' \(use .jsonl, .ndjson, .json, "
                                        r".parquet, .arrow, .csv, a folder of them, or a save_to_disk folder\)"):
        load_stage_dataset([{"path": str(tmp_path / "data.txt")}], tok, 64)
    with pytest.raises(DataError, match="unknown format"):
        load_stage_dataset([{"path": str(tmp_path / "data.txt"), "format": "openai"}], tok, 64)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows \(an empty file\?\)"):
        load_stage_dataset([{"path": str(empty)}], tok, 64)


def test_explicit_format_mismatch_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [messages_row()])
    good, bad, _ = read_conversations(path, "alpaca")
    assert good == [] and [(b.line, b.reason) for b in bad] == [(1, "missing_field")]


def test_json_array_and_json_lines_in_dot_json(tok, tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([messages_row(), {"messages": [{"role": "robot", "content": "x"}]}], indent=1))
    good, bad, n = read_conversations(array)
    assert n == 2 and len(good) == 1 and str(bad[0]).startswith(f"{array}: item 2: unknown_role")
    lines = write_jsonl(tmp_path / "lines.json", [conversations_row(), "{broken"])
    good, bad, n = read_conversations(lines)
    assert n == 2 and len(good) == 1 and str(bad[0]).startswith(f"{lines}:2: invalid_json")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"messages": []},\n{oops}\n]')
    with pytest.raises(DataError, match=r"broken.json:3: invalid_json"):
        read_conversations(broken)


def test_parquet_rows(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [conversations_row(), conversations_row(turns=[("q", "a")]),
            {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "x"}]}]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    good, bad, n = read_conversations(path)
    assert n == 3 and len(good) == 2 and str(bad[0]).startswith(f"{path}: row 3: unknown_role")
    ds, stats = load_stage_dataset([{"path": str(path)}], tok, 256, on_bad_row="skip")
    assert stats.num_rows == 2 and stats.bad_rows == {"unknown_role": 1}


def test_max_samples_is_a_seeded_subset_in_file_order(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(30)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    source = [{"path": str(path), "format": "messages", "max_samples": 7}]
    first, _ = load_stage_dataset(source, tok, 64, seed=1)
    again, stats = load_stage_dataset(source, tok, 64, seed=1)
    other, _ = load_stage_dataset(source, tok, 64, seed=2)
    assert len(first) == 7 and stats.files[str(path)]["used"] == 7
    assert list(first["input_ids"]) == list(again["input_ids"]) != list(other["input_ids"])
    picked = [int(tok.decode([t for t in r if t != IGNORE_INDEX]).split("<")[0][1:]) for r in first["labels"]]
    assert picked == sorted(picked)


def test_collate_pads_right(tok):
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
    assert collate(batch, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "medcare_dist.data", "check", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_check_cli_exit_codes(mixed_file, tmp_path):
    clean = write_jsonl(tmp_path / "clean.jsonl", [messages_row(), conversations_row()])
    ok = run_check(clean)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 rows, 2 valid, 0 bad" in ok.stdout

    bad = run_check(clean, mixed_file)
    assert bad.returncode == 1
    for lineno, (reason, _) in BAD_LINES.items():
        assert f"{mixed_file}:{lineno}: {reason}:" in bad.stdout
    assert "summary: 2 files, 16 rows, 4 valid, 12 bad" in bad.stdout

    missing = run_check(clean, tmp_path / "absent.jsonl")
    assert missing.returncode == 1 and "absent.jsonl: no such file" in missing.stdout
    wrong = run_check(clean, "--format", "alpaca")
    assert wrong.returncode == 1 and "missing_field" in wrong.stdout


# ----- the tokenized cache (medcare_dist.data.token_cache) -----------------------------------------------------

def test_token_cache_equals_direct_tokenization_and_is_reused(tok, tmp_path, monkeypatch):
    from medcare_dist.data import token_cache

    rows = [messages_row()] + [
        {"messages": [{"role": "user", "content": f"Code of item {i}?"},
                      {"role": "assistant", "content": f"E{i}.{i % 7}"}]} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    sources = [{"path": str(data), "format": "auto", "max_samples": 20}]
    args = (sources, tok, 64, "error", 3)
    want, want_stats = load_stage_dataset(*args)

    root = tmp_path / "cache"
    key = token_cache.cache_key(*args)
    assert token_cache.build(root, key, *args) is True
    got, got_stats = token_cache.load(root, key)
    assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    assert got_stats == want_stats

    # Tokenized in three slices (three ranks), then published: the same rows and stats.
    sliced = tmp_path / "sliced"
    for rank in range(3):
        token_cache.build_slice(sliced, key, *args, rank=rank, world=3)
    token_cache.publish(sliced, key, world=3)
    got, got_stats = token_cache.load(sliced, key)
    assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    assert got_stats == want_stats

    # Same inputs: the same key, and build() does not tokenize again.
    assert token_cache.cache_key(*args) == key
    monkeypatch.setattr(token_cache, "tokenize_conversations", lambda *a, **k: pytest.fail("tokenized again"))
    assert token_cache.build(root, key, *args) is False
    monkeypatch.undo()

    # Anything the ids depend on changes the key: the file's bytes, max_length, the seed of the subset.
    assert token_cache.cache_key(sources, tok, 48, "error", 3) != key
    assert token_cache.cache_key(sources, tok, 64, "error", 4) != key
    write_jsonl(data, rows + [messages_row()])
    new_key = token_cache.cache_key(*args)
    assert new_key != key
    assert token_cache.build(root, new_key, *args) is True
    assert sorted(p.name for p in root.iterdir()) == [new_key]  # the stale cache is removed


def test_token_cache_builds_nothing_from_bad_data(tok, tmp_path):
    from medcare_dist.data import token_cache

    data = write_jsonl(tmp_path / "d.jsonl", [messages_row(), b"{not json"])
    args = ([str(data)], tok, 64, "error", 0)
    root = tmp_path / "cache"
    with pytest.raises(DataError, match="d.jsonl:2"):
        token_cache.build(root, token_cache.cache_key(*args), *args)
    assert not root.exists() or not any(root.iterdir())
