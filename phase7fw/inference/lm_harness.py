"""Benchmarks with lm-evaluation-harness (``phase7fw eval CHECKPOINT --tasks NAMES``).

The harness asks a model three things; this framework answers them with its own model,
tokenizer and decoding cache (the optional ``lm-eval`` package is imported only here):

- ``loglikelihood(context, continuation)``: the continuation's log-probability and whether
  greedy decoding would have produced it;
- ``loglikelihood_rolling(text)``: the whole text's log-probability (perplexity tasks);
- ``generate_until(context, until=...)``: greedy or sampled text, stopped at a string.

Every context starts with the end-of-document token, which is how documents start in
training (``Engine.generate`` does the same). Log-probabilities are computed through the
model's cache (``forward_cached``): a model without a context limit (phase7) reads a long
text in chunks of ``seq_len`` tokens with its state carried over, exactly; a model with one
(llama: ``seq_len``) sees at most that many tokens, the harness's rolling windows for long
texts and the most recent tokens of a long context.
"""

from __future__ import annotations

import difflib
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from phase7fw.inference.decoding import context_limit, supports_cache
from phase7fw.errors import Phase7Error


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError:
        raise Phase7Error("--tasks runs lm-evaluation-harness: pip install 'phase7fw[eval]'") from None
    return LM


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def token_logprobs(engine, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[i] | ids[:i]) for i = 1..len(ids)-1 (fp32), through the model's cache, and
    whether each ids[i] is the most likely token there.

    ``ids`` must fit the model's context limit (callers cut them); without a limit the
    tokens go in chunks of ``seq_len`` with the cache carried from chunk to chunk."""
    model = engine.model
    inputs = torch.tensor([ids[:-1]], device=engine.device)
    targets = torch.tensor(ids[1:], device=engine.device)
    was = model.training
    model.eval()
    try:
        with engine.autocast():
            if supports_cache(model):
                cache, parts = model.init_cache(1), []
                step = engine.seq_len if context_limit(model) is None else inputs.shape[1]
                for start in range(0, inputs.shape[1], step):
                    parts.append(model.forward_cached(inputs[:, start:start + step], cache).float())
                logits = torch.cat(parts, dim=1)[0]
            else:
                logits = model(inputs).float()[0]
    finally:
        model.train(was)
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], logits.argmax(-1) == targets


def continuation_logprob(engine, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p(continuation | context), greedy): what the harness calls loglikelihood.
    With a context limit N, only the last N tokens are read (the continuation's end wins)."""
    if not continuation:
        return 0.0, True
    ids = context + continuation
    limit = context_limit(engine.model)
    if limit is not None and len(ids) - 1 > limit:
        ids = ids[len(ids) - 1 - limit:]
    n = min(len(continuation), len(ids) - 1)
    logp, greedy = token_logprobs(engine, ids)
    return float(logp[-n:].sum()), bool(greedy[-n:].all())


def rolling_logprob(engine, tokens: list[int]) -> float:
    """log p(text) of a whole document after the document-start token."""
    if not tokens:
        return 0.0
    eos = engine.tokenizer.eos_id
    limit = context_limit(engine.model)
    if limit is None:  # phase7: one pass, the cache carries the state
        return float(token_logprobs(engine, [eos] + tokens)[0].sum())
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = 0.0
    for window in get_rolling_token_windows(tokens, prefix_token=eos, max_seq_len=limit, context_len=1):
        context, continuation = make_disjoint_window(window)
        total += continuation_logprob(engine, context, continuation)[0]
    return total


def split_context(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context (after the document-start token) and of the continuation,
    cut where the continuation starts in the tokenization of the whole (trailing spaces of
    the context go with the continuation, as the harness's own models do)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return [tokenizer.eos_id] + whole[: len(ctx)], whole[len(ctx):]


# ----------------------------------------------------------------------------- the LM
def make_lm(engine):
    """An ``lm_eval.api.model.LM`` answering with ``engine``'s model (module docstring)."""
    LM = _lm_eval()
    from tqdm import tqdm

    class Phase7fwLM(LM):
        def __init__(self):
            super().__init__()
            self.engine = engine

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm or None, leave=False):
                context, continuation = req.args
                out.append(continuation_logprob(engine, *split_context(engine.tokenizer, context, continuation)))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [rolling_logprob(engine, engine.tokenizer.encode(req.args[0]))
                    for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or None, leave=False)]

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or None, leave=False):
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                sample = bool(kwargs.get("do_sample", False))
                text = engine.generate(
                    context, max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                    temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                    top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), seed=kwargs.get("seed"),
                    stop=until or None, cuda_graph="off",
                )
                out.append(text)
            return out

        @property
        def tokenizer_name(self) -> str:
            return engine.tokenizer.fingerprint()

    return Phase7fwLM()


# ----------------------------------------------------------------------------- tasks
def _unreachable(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (ConnectionError, TimeoutError)) or "Offline" in text or "offline" in text \
                or "Couldn't reach" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@functools.lru_cache(maxsize=4)
def _full_manager(include_paths: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


def load_tasks(names: list[str], include_paths: list[str]):
    """The harness's TaskManager (its registry plus local task folders), after loading each
    task once so that a bad name or an unreachable dataset is one clear error."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).exists():
            raise Phase7Error(f"--include-path: no such folder {path!r}")
    manager = None
    if include_paths:  # local tasks only: indexing the harness's registry takes ~10 s
        manager = TaskManager(include_path=list(include_paths), include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    manager = manager or _full_manager(tuple(include_paths))
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise Phase7Error(f"unknown lm-eval task {name!r}{hint} (local tasks: --include-path FOLDER)")
        try:
            manager.load([name])
        except Exception as exc:  # noqa: BLE001 - the harness and datasets raise many types; name the task
            entry = manager.task_index.get(name)
            dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
            what = f" dataset {dataset!r}" if dataset else " its dataset"
            if _unreachable(exc):
                raise Phase7Error(f"task {name!r}: could not reach{what} (no network, and it is not in the local"
                                  " datasets cache; run once with network access, or use a local task folder"
                                  f" with --include-path): {type(exc).__name__}: {exc}") from None
            raise Phase7Error(f"task {name!r}: loading{what} failed: {type(exc).__name__}: {exc}") from None
    return manager


def run_tasks(engine, names: list[str], *, include_paths=(), num_fewshot: int | None = None,
              limit: float | None = None, output: str | Path | None = None, log_samples: bool = False) -> dict:
    """Evaluate ``engine`` on lm-eval tasks; writes the harness's results JSON to ``output``."""
    manager = load_tasks(list(names), list(include_paths))
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    results = simple_evaluate(model=make_lm(engine), tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=log_samples)
    results["phase7fw"] = {"checkpoint": str(getattr(engine, "checkpoint_file", "")), "step": engine.step,
                           "model_name": engine.model_name, "seconds": time.perf_counter() - start}
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return results


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)
