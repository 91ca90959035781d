"""Talk to a trained model: `medcare-chat` / `python -m medcare_dist.chat`.

    python -m medcare_dist.chat runs/demo                        # interactive, a training run directory
    python -m medcare_dist.chat --model runs/demo/final --prompt "Which ICD-10-CM code is essential hypertension?"
    python -m medcare_dist.chat --model runs/demo/merged_base --adapters runs/demo/stage2/adapters --file q.jsonl --output a.jsonl

The model's own chat template renders the conversation; replies stream token by token and stop at the end of
the assistant turn (<|im_end|>) or the eos. Interactive commands: /clear (forget the history), /exit.
--file takes JSON lines with `prompt` (a string) or `messages` (a conversation) and writes one line each
with the reply.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from medcare_dist.errors import InputError


class ChatError(InputError):
    pass


def resolve_model(target: str | None, model: str | None, adapters: str | None) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None) of a run directory, or of --model / --adapters."""
    if model:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ChatError(f"--model {model}: not a Hugging Face model directory (no config.json)")
        return path, Path(adapters) if adapters else None
    if not target:
        raise ChatError("no model: give a training run directory, or --model DIR (and --adapters DIR)")
    run = Path(target)
    if (run / "config.json").is_file():
        return run, Path(adapters) if adapters else None
    if (run / "final" / "config.json").is_file():
        return run / "final", None
    merged = run / "merged_base"
    if (merged / "config.json").is_file():  # stage 1 done, stage 2 not: the TAIA model
        return merged, merged / "knowledge_adapters"
    raise ChatError(f"{run}: neither a model directory nor a run with final/ or merged_base/")


class Chat:
    """A conversation with one model: history, template rendering, streamed generation."""

    def __init__(self, model, tokenizer, device, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0):
        from medcare_dist.eval.harness import stop_token_ids

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.system = system
        self.history: list[dict] = []
        self.stops = stop_token_ids(tokenizer, model)
        self.gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
                    "repetition_penalty": repetition_penalty, "eos_token_id": self.stops,
                    "pad_token_id": tokenizer.pad_token_id}
        if temperature > 0:
            self.gen.update(temperature=temperature, top_p=top_p, top_k=top_k)

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def reply(self, messages: list[dict], on_text=None) -> str:
        """The assistant's answer to `messages`, its text passed to `on_text` piece by piece as it is made."""
        import torch
        from transformers import TextIteratorStreamer

        from medcare_dist.eval.harness import render_prompt

        prompt = render_prompt(self.tokenizer, messages)
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**ids, streamer=streamer, **self.gen)
            except Exception as e:  # re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        for text in streamer:
            pieces.append(text)
            if on_text is not None:
                on_text(text)
        worker.join()
        if errors:
            raise errors[0]
        return "".join(pieces).strip()

    def turn(self, user: str, on_text=None) -> str:
        answer = self.reply(self.messages(user), on_text)
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


def interactive(chat: Chat, stdin=sys.stdin, stdout=sys.stdout):
    stdout.write("medcare-chat: type a message; /clear forgets the conversation, /exit (or Ctrl-D) quits.\n")
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            chat.history.clear()
            stdout.write("(history cleared)\n")
            continue
        stdout.write("assistant> ")
        chat.turn(text, on_text=lambda t: (stdout.write(t), stdout.flush()))
        stdout.write("\n")


def batch(chat: Chat, path: Path, output: Path | None):
    """One reply per JSON line of `path` ({"prompt": ...} or {"messages": [...]}), each its own conversation."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ChatError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            messages = chat.messages(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"]):
            messages = row["messages"]
        else:
            raise ChatError(f"{path}:{lineno}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [{{role, "
                            "content}, ...]}")
        rows.append((row, messages))
    out = open(output, "w", encoding="utf-8") if output else sys.stdout
    try:
        for row, messages in rows:
            out.write(json.dumps({**row, "response": chat.reply(messages)}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if output:
            out.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="medcare-chat", description="Chat with a trained model (its chat template, "
                                "streamed replies, stopping at the end of the assistant turn).")
    p.add_argument("run", nargs="?", help="a training run directory (final/, else merged_base/ + its "
                                          "knowledge adapters) or a model directory")
    p.add_argument("--model", help="a Hugging Face model directory (final/, merged_base/, an export)")
    p.add_argument("--adapters", help="medcare-dist adapters to load on --model (e.g. RUN/stage2/adapters)")
    p.add_argument("--prompt", help="one message, one reply, then exit")
    p.add_argument("--file", help="JSON lines of {prompt} or {messages}: one reply each")
    p.add_argument("--output", help="with --file: where the replies go (default stdout)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.prompt is not None and args.file is not None:
            raise ChatError("give --prompt or --file, not both")
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ChatError("--max-new-tokens must be >= 1, --temperature >= 0, --top-p in (0, 1]")
        if args.file is not None and not Path(args.file).is_file():
            raise ChatError(f"--file {args.file}: no such file")
        model_dir, adapters = resolve_model(args.run, args.model, args.adapters)
        import torch

        from medcare_dist.eval.harness import load_model

        torch.manual_seed(args.seed)
        model, tokenizer, device = load_model(model_dir, adapters, args.dtype, args.device)
        chat = Chat(model, tokenizer, device, args.system, args.max_new_tokens, args.temperature, args.top_p,
                    args.top_k, args.repetition_penalty)
        if args.prompt is not None:
            chat.turn(args.prompt, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")
        elif args.file is not None:
            batch(chat, Path(args.file), Path(args.output) if args.output else None)
        else:
            interactive(chat)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
