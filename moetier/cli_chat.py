"""``moetier chat``: an interactive multi-turn chat in the terminal, as ``ollama run`` has.

Each line typed is a user turn; the reply streams as it is generated and joins the history, so
the next turn sees the whole conversation (through the model's chat template). Ctrl-C stops a
reply (the interrupted exchange is left out of the history), not the session; Ctrl-D or ``/bye``
ends it. Lines can also come from a pipe: ``printf 'What is 12+34?\\n' | moetier chat --model demo``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from .cli_args import add_model_args, add_sampling_args, open_llm, print_stats, sampling_params
from .errors import MoetierError

HELP = """\
Commands:
  /clear          forget the conversation (the --system message stays)
  /system TEXT    set the system message (and forget the conversation)
  /bye            leave (or Ctrl-D)
  /help           this list
Ctrl-C stops a reply; the interrupted exchange is left out of the history."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="chat with a model in the terminal, turn by turn (history, streaming)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An interactive chat: type a message, the reply streams back, and the conversation\n"
                    "so far goes with every turn (through the model's chat template). Ctrl-C stops a\n"
                    "reply, not the session; Ctrl-D or /bye ends it; /help lists the commands.\n\n"
                    "  moetier chat --model demo\n"
                    "  moetier chat --model demo --system \"Answer with the sum only.\"")
    add_model_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message put before the conversation")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


class _Stop:
    """SIGINT while a reply streams: stop it at the next piece instead of raising in the model's math."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def _reply(llm, messages: list[dict], params, asked, out) -> "str | None":
    """Stream the reply to ``messages``; its text, or None if Ctrl-C stopped it."""
    from .openai_api import check_context
    from .tokenizer import chat_prompt

    ids = chat_prompt(llm.tokenizer, messages)
    params.max_tokens = check_context(len(ids), asked, llm.engine.max_model_len)
    text = ""
    pieces = llm.stream({"prompt_token_ids": ids}, params)
    with _Stop() as stop:
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
                text += piece
                if stop.hit:
                    break
        finally:
            pieces.close()  # aborts the request in the engine
    out.write("\n")
    out.flush()
    return None if stop.hit else text


def cmd_chat(args) -> int:
    asked = args.max_tokens
    params = sampling_params(args)  # bad values fail before the model loads
    llm = open_llm(args)
    try:
        from .tokenizer import chat_prompt

        chat_prompt(llm.tokenizer, [{"role": "user", "content": ""}])  # no chat template: one line, now
        return _session(llm, args, params, asked)
    finally:
        print_stats(llm, args)
        llm.close()


def _session(llm, args, params, asked) -> int:
    tty = sys.stdin.isatty()
    if tty:
        try:
            importlib.import_module("readline")  # line editing and history for input()
        except ImportError:
            pass
        print("Type a message (/help for commands, Ctrl-D to leave).", file=sys.stderr)
    system = args.system
    history: list[dict] = []
    while True:
        try:
            line = input(">>> " if tty else "")
        except EOFError:
            if tty:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\nUse Ctrl-D or /bye to leave.", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/bye", "/exit", "/quit"):
                return 0
            if cmd == "/clear":
                history = []
                print("[the conversation is cleared]", file=sys.stderr)
            elif cmd == "/system":
                system, history = rest.strip() or None, []
                print("[system message set; the conversation is cleared]", file=sys.stderr)
            elif cmd == "/help":
                print(HELP, file=sys.stderr)
            else:
                print(f"unknown command {cmd} (/help lists them)", file=sys.stderr)
            continue
        turn = history + [{"role": "user", "content": line}]
        messages = ([{"role": "system", "content": system}] if system else []) + turn
        try:
            text = _reply(llm, messages, params, asked, sys.stdout)
        except (MoetierError, ValueError) as e:  # the conversation outgrew the context: say so, go on
            print(f"moetier: error: {e} (/clear starts afresh)", file=sys.stderr)
            continue
        if text is None:
            print("[stopped]", file=sys.stderr)
            continue
        history = turn + [{"role": "assistant", "content": text}]
        if tty:
            print()
