"""medcare-chat: one-shot, batch and an interactive session through a pty, on a tiny model whose greedy reply
ends with <|im_end|> part-way; the replies are checked against model.generate run without any stop."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, base_env

IM_END = "<|im_end|>"
QUESTION = "Which ICD-10-CM code is essential hypertension?"


def _greedy(model, tok, messages, n=24):
    """The greedy continuation with no stop token at all (the reference the chat must cut at <|im_end|>)."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 with the demo tokenizer, edited so that its greedy reply to QUESTION emits
    <|im_end|> after a few tokens (and would go on after it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medcare_dist.demo.assets import prepare_demo

    root = tmp_path_factory.mktemp("chat")
    assets = prepare_demo(root / "demo_assets")
    tok = assets.tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=assets.config.vocab_size, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    im_end = tok.convert_tokens_to_ids(IM_END)
    messages = [{"role": "user", "content": QUESTION}]
    third = _greedy(model, tok, messages)[3]
    with torch.no_grad():  # <|im_end|> scores 1.5x the token greedy decoding picked at step 3
        model.lm_head.weight[im_end] = 1.5 * model.lm_head.weight[third]
    reference = _greedy(model, tok, messages)
    assert im_end in reference and reference.index(im_end) < len(reference) - 2   # it would go on after it
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def expected_reply(model_dir, messages):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = _greedy(model, tok, messages)
    stops = {tok.convert_tokens_to_ids(IM_END), tok.eos_token_id}
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))  # else the 24-token budget
    return tok.decode(tokens[:cut], skip_special_tokens=True).strip()


def chat_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "medcare_dist.chat", *args], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kw)


def test_one_shot_and_batch_replies_stop_at_the_end_of_the_turn(model_dir, tmp_path):
    want = expected_reply(model_dir, [{"role": "user", "content": QUESTION}])
    proc = chat_cli("--model", str(model_dir), "--prompt", QUESTION, "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == want and IM_END not in proc.stdout

    questions = tmp_path / "q.jsonl"
    system = [{"role": "system", "content": "You are a coder."}, {"role": "user", "content": QUESTION}]
    questions.write_text(json.dumps({"id": 1, "prompt": QUESTION}) + "\n" + json.dumps({"messages": system}) + "\n")
    out = tmp_path / "a.jsonl"
    proc = chat_cli("--model", str(model_dir), "--file", str(questions), "--output", str(out),
                    "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"id": 1, "prompt": QUESTION, "response": want}
    assert rows[1]["response"] == expected_reply(model_dir, system)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 5}\n')
    proc = chat_cli("--model", str(model_dir), "--file", str(bad))
    assert proc.returncode == 2 and "bad.jsonl:1: expected" in proc.stderr and "Traceback" not in proc.stderr


def _read_until(fd, marker: str, timeout: float = 120) -> str:
    buf, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    assert marker.encode() in buf, buf.decode(errors="replace")[-2000:]
    return buf.decode(errors="replace")


def test_an_interactive_session_keeps_the_history_and_clears_it(model_dir):
    first = [{"role": "user", "content": QUESTION}]
    want1 = expected_reply(model_dir, first)
    want2 = expected_reply(model_dir, first + [{"role": "assistant", "content": want1},
                                               {"role": "user", "content": "And I11?"}])
    want3 = expected_reply(model_dir, [{"role": "user", "content": "And I11?"}])
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execvpe(sys.executable, [sys.executable, "-m", "medcare_dist.chat", "--model", str(model_dir),
                                    "--max-new-tokens", "24"], base_env())
    try:
        _read_until(fd, "you> ")
        os.write(fd, (QUESTION + "\n").encode())
        out = _read_until(fd, "you> ")
        assert f"assistant> {want1}" in out.replace("\r", "")
        os.write(fd, b"And I11?\n")                              # answered with the first turn in view
        assert f"assistant> {want2}" in _read_until(fd, "you> ").replace("\r", "")
        os.write(fd, b"/clear\n")
        assert "(history cleared)" in _read_until(fd, "you> ")
        os.write(fd, b"And I11?\n")                              # the same message, no history now
        assert f"assistant> {want3}" in _read_until(fd, "you> ").replace("\r", "")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_a_run_directory_resolves_to_its_final_model_or_the_taia_model(tmp_path):
    from medcare_dist.chat import ChatError, resolve_model

    run = tmp_path / "run"
    (run / "merged_base" / "knowledge_adapters").mkdir(parents=True)
    (run / "merged_base" / "config.json").write_text("{}")
    assert resolve_model(str(run), None, None) == (run / "merged_base", run / "merged_base" / "knowledge_adapters")
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert resolve_model(str(run), None, None) == (run / "final", None)
    with pytest.raises(ChatError, match="neither a model directory nor a run"):
        resolve_model(str(tmp_path / "nothing"), None, None)
