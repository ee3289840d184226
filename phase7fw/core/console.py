"""What a run prints: the pinned step line, the run header, a progress bar on a terminal."""

from __future__ import annotations

import math
import os
import sys

from tqdm import tqdm


def step_line(step: int, loss: float, lr: float, grad_norm: float, step_time: float, extra: dict | None = None) -> str:
    """``Step   1000 | Loss: 3.2145 | PPL: 24.87 | LR: 2.50e-04 | Grad: 0.823 | Time: 0.45s``."""
    line = (
        f"Step {step:>6} | Loss: {loss:.4f} | PPL: {perplexity(loss):.2f} | LR: {lr:.2e}"
        f" | Grad: {grad_norm:.3f} | Time: {step_time:.2f}s"
    )
    for key, value in (extra or {}).items():
        line += f" | {key}: {value}"
    return line


def val_line(step: int, loss: float, bpb: float | None = None) -> str:
    """``Val     300 | Loss: 1.2345 | PPL: 3.44 | BPB: 1.6543`` (BPB when the data has text)."""
    line = f"Val  {step:>6} | Loss: {loss:.4f} | PPL: {perplexity(loss):.2f}"
    return line + (f" | BPB: {bpb:.4f}" if bpb is not None else "")


def bits_per_byte(loss: float, tokens: float, n_bytes: float | None) -> float | None:
    """Mean loss (nats per token) over ``tokens`` tokens that came from ``n_bytes`` bytes of
    UTF-8 text, as bits per byte: loss / ln 2 * tokens / bytes. Tokenizer-independent, so
    models with different vocabularies compare. None when the byte count is unknown."""
    if not n_bytes:
        return None
    return loss / math.log(2) * tokens / n_bytes


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an overflow, nan stays nan."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def silence_stdout() -> None:
    """After a closed pipe (``phase7fw ... | head``): the rest of stdout goes to /dev/null, so
    later prints and the interpreter's final flush do not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout without a file descriptor (captured in tests)
        pass


class Console:
    """Prints lines (around a progress bar when stderr is a terminal). Silent on rank != 0.
    A closed stdout (``phase7fw run ... | head``) silences the console; the run goes on and
    writes its log and checkpoints as usual."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def print(self, text: str = "") -> None:
        if not self.enabled:
            return
        try:
            if self.bar is not None:
                self.bar.write(text, file=sys.stdout)
            else:
                print(text, flush=True)
        except BrokenPipeError:
            silence_stdout()
            self.enabled = False

    def start_bar(self, total: int, initial: int) -> None:
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def advance(self, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
