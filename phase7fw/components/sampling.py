"""The built-in ``sample`` callback (``[[callbacks]]`` in a recipe): print what the model
writes for a prompt at the end of the run (and, with ``at_eval``, after every validation), so
a run shows what it learned, not only a loss::

    [[callbacks]]
    name = "sample"
    prompt = "def "
"""

from __future__ import annotations

import attrs

from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import Callback
from phase7fw.recipe.options import in_range, non_negative, option, positive


@attrs.frozen
class SampleConfig:
    prompt: str = option("def ", help="the text the model continues")
    count: int = option(4, check=positive, help="samples, with seeds seed, seed + 1, ...")
    stop: str = option("\n", help='end each sample at this text ("\\n": one line each; "": no stop)')
    max_new_tokens: int = option(60, check=positive, help="tokens per sample at most")
    temperature: float = option(0.5, check=non_negative, help="0 = greedy")
    top_k: int = option(20, check=non_negative, help="sample among the k most likely tokens (0: all)")
    top_p: float = option(1.0, check=in_range(0.0, 1.0, lo_open=True), help="nucleus sampling (1: off)")
    repetition_penalty: float = option(1.0, check=positive, help="> 1 discourages repeats")
    seed: int = option(0, check=non_negative, help="the first sample's seed (the same samples for the same weights)")
    at_eval: bool = option(False, help="also after every validation, not only at the end of the run")


class Sample(Callback):
    """Prints ``count`` continuations of ``prompt``. One line each by default: a small model
    shows what it learned in its first line (a ``def`` line, a call) long before it can
    lay out a whole block."""

    def __init__(self, config: SampleConfig):
        self.config = config

    def samples(self, engine) -> list[str]:
        c = self.config
        return [c.prompt + engine.generate(c.prompt, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                           top_k=c.top_k or None, top_p=c.top_p if c.top_p < 1 else None,
                                           repetition_penalty=c.repetition_penalty, seed=c.seed + i,
                                           stop=c.stop or None)
                for i in range(c.count)]

    def on_run_start(self, engine) -> None:
        if engine.dist.strategy == "fsdp":
            engine.console.print("callback sample: off under FSDP (generation reads unsharded weights); sample the"
                                 " checkpoint afterwards: phase7fw generate CHECKPOINT --prompt ...")

    def _show(self, engine, when: str) -> None:
        if engine.dist.strategy == "fsdp" or not engine.dist.is_main:  # one rank samples, from full weights
            return
        c = self.config
        seeds = f"seed {c.seed}" if c.count == 1 else f"seeds {c.seed}-{c.seed + c.count - 1}"
        engine.console.print(f"Samples at step {engine.step} ({when}; temperature {c.temperature:g}"
                             + (f", top-k {c.top_k}" if c.top_k else "") + f", {seeds}"
                             + (", one line each" if c.stop == "\n" else "") + "):")
        for text in self.samples(engine):
            text = printable(text)
            engine.console.print(text if "\n" in text else "  " + text)
        engine.console.print("-" * 40)

    def on_eval_end(self, engine, row: dict) -> None:
        if self.config.at_eval:
            self._show(engine, "after validation")

    def on_run_end(self, engine, summary: dict) -> None:
        self._show(engine, "end of the run")


def printable(text: str) -> str:
    """Control characters (an early model writes any byte) as escapes: they would move the
    cursor or split a line on a terminal. Newlines and tabs stay."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else ascii(ch)[1:-1] for ch in text)


def build_sample(config: SampleConfig, **context) -> Sample:
    return Sample(config)


@hookimpl
def register_components(register):
    register("callback", "sample", build_sample, SampleConfig,
             description="print the model's continuation of a prompt at the end of the run (and at each validation)")
