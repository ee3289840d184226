"""``phase7fw chat``: a REPL that streams the model's replies.

The models are plain language models (no chat tuning), so the conversation is a transcript::

    User: hello
    Assistant: <reply>
    User: ...

and a reply ends at the end-of-document token, at ``"\\nUser:"`` or after ``max_new_tokens``.
The transcript is kept within the model's context (``seq_len`` minus room for the reply) by
dropping the oldest turns. The decoding cache survives from turn to turn while the transcript
only grows, so a turn costs only its new tokens.
"""

from __future__ import annotations

import sys

from phase7fw.errors import Phase7Error
from phase7fw.inference.generation import SamplingParams, generate_text

USER, BOT, STOP = "User: ", "Assistant:", "\nUser:"

HELP = """commands:
  /set NAME VALUE   change a sampling setting (temperature, top_k, top_p, repetition_penalty,
                    max_new_tokens, seed; "none" clears top_k/top_p/seed)
  /show             print the settings
  /reset            forget the conversation
  /exit             quit (also /quit, Ctrl-D)"""


# ----------------------------------------------------------------------------- session
class ChatSession:
    """A conversation with one model: the transcript and a decoder whose cache follows it."""

    def __init__(self, engine, params: SamplingParams, use_cache: bool = True, cuda_graph: str = "auto",
                 compile_step: bool = False):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.params = params.checked()
        self.decoder = engine.decoder(use_cache=use_cache, cuda_graph=cuda_graph, compile_step=compile_step)
        self.turns: list[tuple[str, str]] = []
        self.generator = None
        self._seed_generator()

    def _seed_generator(self) -> None:
        import torch

        seed = self.params.seed
        self.generator = None if seed is None else torch.Generator(device=self.engine.device).manual_seed(seed)

    def set(self, name: str, value: str) -> str:
        self.params = self.params.with_setting(name, value)
        if name.replace("-", "_") == "seed":
            self._seed_generator()
        return f"{name.replace('-', '_')} = {getattr(self.params, name.replace('-', '_'))}"

    def reset(self) -> None:
        self.turns = []
        self.decoder.reset()

    def _transcript(self, message: str) -> list[int]:
        """Token ids of the transcript ending with ``message`` and the reply cue, oldest turns
        dropped until it leaves room for a reply in the model's context."""
        tok = self.tokenizer
        budget = max(1, self.engine.seq_len - min(self.params.max_new_tokens, self.engine.seq_len // 2))
        while True:
            text = "".join(f"{USER}{m}\n{BOT}{r}\n" for m, r in self.turns) + f"{USER}{message}\n{BOT}"
            ids = [tok.eos_id] + tok.encode(text)
            if len(ids) <= budget:
                return ids
            if not self.turns:  # one message longer than the context: keep its end
                return [tok.eos_id] + ids[len(ids) - budget + 1 :]
            self.turns.pop(0)

    def reply(self, message: str, on_text=None) -> str:
        self.decoder.sync(self._transcript(message))
        text = generate_text(self.decoder, self.tokenizer, self.params, stop=STOP, on_text=on_text,
                             generator=self.generator)
        self.turns.append((message, text))
        return text


# ----------------------------------------------------------------------------- REPL
def _lines(stdin, interactive: bool):
    if not interactive:
        yield from stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def run_chat(engine, params: SamplingParams, *, use_cache: bool = True, cuda_graph: str = "auto",
             compile_step: bool = False, label: str = "", stdin=None, stdout=None, stderr=None) -> int:
    """The REPL. On a terminal: a ``> `` prompt with line editing; otherwise one message per
    input line and one reply per output line (scripts, pipes, tests)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin is sys.stdin and stdin.isatty() and stdout.isatty()
    session = ChatSession(engine, params, use_cache=use_cache, cuda_graph=cuda_graph, compile_step=compile_step)
    print(f"chat with {label or engine.model_name} ({engine.model_name}, step {engine.step}, device"
          f" {engine.device}); /help for commands", file=stderr, flush=True)

    def write(piece: str) -> None:
        stdout.write(piece.replace("\n", " ") if not interactive else piece)  # one reply per line
        stdout.flush()

    for raw in _lines(stdin, interactive):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, *rest = line.split()
            if cmd in ("/exit", "/quit"):
                break
            try:
                if cmd == "/reset":
                    session.reset()
                    print("(conversation reset)", file=stdout, flush=True)
                elif cmd == "/set" and len(rest) == 2:
                    print(session.set(*rest), file=stdout, flush=True)
                elif cmd == "/show":
                    print(session.params.describe(), file=stdout, flush=True)
                elif cmd == "/help":
                    print(HELP, file=stdout, flush=True)
                elif cmd == "/set":
                    raise Phase7Error("usage: /set NAME VALUE (e.g. /set temperature 0.7)")
                else:
                    raise Phase7Error(f"unknown command {cmd}; /help lists the commands")
            except Phase7Error as exc:  # a typo must not end the conversation
                print(f"error: {exc}", file=stderr, flush=True)
            continue
        session.reply(line, on_text=write)
        stdout.write("\n")
        stdout.flush()
    return 0
