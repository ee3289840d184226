"""``phase7fw recipe new``: write a data-mix recipe on top of a shipped model preset.

Non-interactive (every answer a flag)::

    phase7fw recipe new --preset phase7_small --source python_stdlib:1.0 \
        --source text_files:paths=data/*.txt:0.5 --tokens 50M --output my.toml

A component spec is ``NAME[:KEY=VALUE]...[:WEIGHT]``. A ``:`` starts a new option only when
an option name and ``=`` follow it, so values may hold colons (``split=train[:10%]``); list
options take comma-separated items (``paths=a/*.txt,b/*.md``); a trailing number is the
source's weight. On a terminal (or with ``--interactive``, reading answers from stdin) the
questions whose flags are missing are asked. The written recipe ``extends`` the preset and
is validated before it is put in place.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import tomllib
import typing
from pathlib import Path

import attrs
import tomli_w

from phase7fw.errors import Phase7Error, RecipeError
from phase7fw.fileio import writing
from phase7fw.recipe import load_recipe
from phase7fw.recipe.convert import structure_component

_OPTION_START = re.compile(r":(?=[A-Za-z_][A-Za-z0-9_]*=)")
_WEIGHT = re.compile(r":([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
DEFAULT_OUTPUT = "recipes/my_recipe.toml"
DEFAULT_PRESET = "phase7_tiny"


# ------------------------------------------------------------------------- presets
def preset_dirs() -> list[Path]:
    """``./recipes`` first, then the recipes shipped next to the package (a source checkout)."""
    dirs = [Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def find_presets() -> dict[str, Path]:
    presets: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.toml")):
            presets.setdefault(p.stem, p)
    return presets


def preset_path(name: str) -> Path:
    """A preset by name (``phase7_small``) or a path to any recipe file."""
    p = Path(name).expanduser()
    if p.suffix == ".toml" and p.is_file():
        return p.resolve()
    presets = find_presets()
    if name in presets:
        return presets[name]
    listed = ", ".join(presets) or f"none found in {', '.join(map(str, preset_dirs())) or './recipes'}"
    raise Phase7Error(f"--preset {name!r}: no such preset or recipe file; presets: {listed}")


def describe_preset(path: Path) -> str:
    """The first sentence of a recipe file's leading comment, as its one-line description."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    return re.split(r"(?<=[.:])\s", text, maxsplit=1)[0].rstrip(".:") if text else ""


# ------------------------------------------------------------------------- parsing
def parse_tokens(text: str) -> int:
    """``50M``, ``1.5B``, ``200k``, ``1e9``, ``1_000_000`` -> a positive token count."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise Phase7Error(f"--tokens {text!r}: expected a count like 50M, 1.5B, 200K or 1000000")
    n = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()]
    if n < 1:
        raise Phase7Error(f"--tokens {text!r}: must be at least 1 token")
    return int(n)


def _field_types(kind: str, name: str, registry) -> dict[str, object]:
    cls = registry.get(kind, name).config_cls
    attrs.resolve_types(cls)
    return {f.name: f.type for f in attrs.fields(cls)}


def _is_list(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _value(text: str, tp):
    """An option value from the command line: str options verbatim, list options split on
    commas, everything else read as a TOML value (1, 0.5, true) or else kept as text."""
    if tp is str:
        return text
    if _is_list(tp):
        (item,) = typing.get_args(tp)[:1] or (str,)
        return [_value(x.strip(), item) for x in text.split(",") if x.strip()]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_spec(spec: str, kind: str, registry, *, with_weight: bool) -> dict:
    """``NAME[:KEY=VALUE]...[:WEIGHT]`` -> a raw recipe table (validated later, with the rest)."""
    flag = "--source" if kind == "data_source" else "--tokenizer"
    raw: dict = {}
    body = spec.strip()
    if with_weight:
        m = _WEIGHT.search(body)
        if m and "=" not in body[m.start():]:
            raw["weight"] = float(m.group(1))
            body = body[: m.start()]
    name, *options = _OPTION_START.split(body)
    if not name or "=" in name:
        raise Phase7Error(f"{flag} {spec!r}: expected NAME[:KEY=VALUE]...{'[:WEIGHT]' if with_weight else ''}")
    if (kind, name) not in registry:
        raise Phase7Error(f"{flag} {spec!r}: unknown {kind} {name!r}; registered: {', '.join(registry.names(kind))}")
    types = _field_types(kind, name, registry)
    table = {"name": name}
    for opt in options:
        key, _, text = opt.partition("=")
        if key not in types:
            allowed = ", ".join(types) or "none"
            raise Phase7Error(f"{flag} {spec!r}: {name} has no option {key!r} (options: {allowed})")
        table[key] = _value(text, types[key])
    return {**table, **raw}


def check_source(table: dict, registry, where: str) -> None:
    """Structure and build a source table: catches bad options and missing files now, not
    at the first run (hub datasets are not downloaded by this)."""
    errors: list[str] = []
    spec = structure_component(table, "data_source", registry, where, errors)
    if errors:
        raise Phase7Error("; ".join(errors))
    registry.build("data_source", spec.name, spec.config, cache_dir="", seed=0)


# ------------------------------------------------------------------------- writing
def _steps_for(tokens: int, recipe) -> tuple[int, int]:
    per_step = recipe.train.batch_size * recipe.train.grad_accum_steps * recipe.model.config.seq_len
    return max(1, math.ceil(tokens / per_step)), per_step


def extends_ref(preset: Path, output: Path) -> str:
    """How the new recipe names its preset: relative to the recipe's own folder (the loader
    reads it from there) when the two share a folder below the root, so a project moves as a
    whole; else absolute (``/tmp/mix.toml`` extending ``/home/me/phase7fw/recipes/...`` would
    otherwise climb to the root: ``../home/me/...``)."""
    preset, folder = preset.resolve(), output.resolve().parent
    if os.path.commonpath([preset, folder]) == os.path.dirname(os.path.abspath(os.sep)):
        return str(preset)
    return os.path.relpath(preset, folder)


def build_recipe(*, preset: Path, sources: list[dict], tokenizer: dict | None, tokens: int | None,
                 output: Path, plugins) -> tuple[dict, list[str]]:
    """The new recipe's tables (on top of ``preset``) and its header comment lines."""
    base = load_recipe(preset, plugins=plugins)
    body: dict = {"extends": extends_ref(preset, output)}
    body["run"] = {"name": output.stem}
    notes = [f"Written by `phase7fw recipe new` on {time.strftime('%Y-%m-%d')}: preset {preset.stem}"
             f" ({describe_preset(preset) or preset.name})",
             f"Prepare the data: phase7fw data prepare {output}",
             f"Train:            phase7fw run {output}"]
    if tokens is not None:
        steps, per_step = _steps_for(tokens, base)
        body["train"] = {"max_steps": steps}
        notes.append(f"Token budget {tokens:,} = {steps:,} steps x {per_step:,} tokens/step"
                     " (batch_size x grad_accum_steps x seq_len)")
        for section in ("lr_scheduler", "curvature_scheduler"):
            comp = getattr(base, section)
            warm = getattr(comp.config, "warmup_steps", None) if comp is not None else None
            if isinstance(warm, int) and warm > steps // 5:
                body[section] = {"warmup_steps": max(1, steps // 10)}
                notes.append(f"{section}.warmup_steps {warm} -> {max(1, steps // 10)} (10% of the shorter run)")
    data: dict = {}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
        size = tokenizer.get("vocab_size")
        model_vocab = getattr(base.model.config, "vocab_size", 0)
        if isinstance(size, int) and model_vocab and model_vocab < size:
            body["model"] = {"vocab_size": size}
    data["sources"] = sources
    body["data"] = data
    return body, notes


def write_recipe(body: dict, notes: list[str], output: Path, plugins, *, force: bool) -> object:
    """Validate the recipe where it will live (``extends`` is relative), then move it in place."""
    if output.exists() and not force:
        raise Phase7Error(f"{output} exists; choose another --output or pass --force to overwrite it")
    text = "".join(f"# {n}\n" for n in notes) + "\n" + tomli_w.dumps(body)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp.toml")
    try:
        with writing(output):
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
        try:
            recipe = load_recipe(tmp, plugins=plugins)
        except RecipeError as exc:
            raise RecipeError(exc.errors, source=f"{output} (not written)") from None
        with writing(output):
            os.replace(tmp, output)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder could not be made: there is no temporary file
            pass
    return recipe


# ------------------------------------------------------------------------- asking
class _Asker:
    """Questions on stdout, answers from stdin; end of input is a clear error."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin

    def __call__(self, question: str, default: str | None = None) -> str:
        hint = f" [{default}]" if default not in (None, "") else ""
        print(f"{question}{hint}: ", end="", flush=True)
        line = self.stream.readline()
        if not line:
            print()
            raise Phase7Error(f"recipe new: input ended at the question {question!r}")
        answer = line.strip()
        if not self.stream.isatty():
            print(answer)  # keep a readable transcript when answers are piped in
        return answer if answer else (default or "")


def _ask_preset(ask) -> Path:
    presets = find_presets()
    print("Model presets:")
    names = list(presets)
    for i, name in enumerate(names, 1):
        about = describe_preset(presets[name])
        print(f"  {i:>2}. {name:<20} {about[:70] + '...' if len(about) > 73 else about}")
    while True:
        answer = ask("Model preset (number, name or .toml path)", DEFAULT_PRESET if DEFAULT_PRESET in presets else None)
        if answer.isdigit() and 1 <= int(answer) <= len(names):
            answer = names[int(answer) - 1]
        try:
            return preset_path(answer)
        except Phase7Error as exc:
            print(f"  {exc}")


def _ask_options(ask, kind: str, name: str, registry) -> dict:
    """Each option of the component: required ones must be answered, Enter keeps a default."""
    table: dict = {"name": name}
    cls = registry.get(kind, name).config_cls
    attrs.resolve_types(cls)
    for f in attrs.fields(cls):
        required = f.default is attrs.NOTHING
        default = None if required else _show_default(f)
        lists = " (comma-separated)" if _is_list(f.type) else ""
        help_ = f.metadata.get("help", "")
        question = f"  {f.name}{lists}" + (f" - {help_}" if help_ else "")
        while True:
            answer = ask(question, default)
            if answer or not required:
                break
            print(f"  {f.name} is required")
        if answer and answer != default:
            table[f.name] = _value(answer, f.type)
    return table


def _show_default(f) -> str:
    value = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
    if _is_list(f.type):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ask_component(ask, kind: str, registry, *, path: str, name: str | None = None,
                   first_default: str | None = None, with_weight: bool = False):
    """A component table: its name (unless given), its options, its weight; None when the
    user ends the list (Enter without a default)."""
    names = registry.names(kind)
    while True:
        if name is None:
            name = ask(f"{path}: {' / '.join(names)}" + ("" if first_default else " (Enter to finish)"),
                       first_default)
            if not name:
                return None
            if name not in names:
                print(f"  unknown {kind} {name!r}")
                name = None
                continue
        table = _ask_options(ask, kind, name, registry)
        if with_weight:
            while True:
                try:
                    weight = float(ask("  weight (share of the mix)", "1.0"))
                    if weight > 0:
                        break
                except ValueError:
                    pass
                print("  the weight must be a number > 0")
            table["weight"] = weight
        try:
            if with_weight:
                check_source(table, registry, path)
            else:
                errors: list[str] = []
                structure_component(table, kind, registry, path, errors)
                if errors:
                    raise Phase7Error("; ".join(errors))
            return table
        except Phase7Error as exc:
            print(f"  {exc}")
        print("  let's try that one again")
        name = None if with_weight else name


def interactive(args, plugins, answers: dict) -> dict:
    """Ask what the flags did not answer; returns the completed answers."""
    registry = plugins.registry
    ask = _Asker()
    print("phase7fw recipe new: a data-mix recipe on top of a model preset (Enter keeps [defaults]).")
    if answers["preset"] is None:
        answers["preset"] = _ask_preset(ask)
    base = load_recipe(answers["preset"], plugins=plugins)
    if not answers["sources"]:
        sources = []
        while True:
            table = _ask_component(ask, "data_source", registry, path=f"Data source {len(sources) + 1}",
                                   first_default=None if sources else "python_stdlib", with_weight=True)
            if table is None:
                break
            sources.append(table)
        answers["sources"] = sources
    if answers["tokenizer"] is None:
        keep = base.data.tokenizer.name
        name = ask(f"Tokenizer: {' / '.join(registry.names('tokenizer'))}", keep)
        if name != keep:
            if name not in registry.names("tokenizer"):
                raise Phase7Error(f"recipe new: unknown tokenizer {name!r}; registered:"
                                  f" {', '.join(registry.names('tokenizer'))}")
            answers["tokenizer"] = _ask_component(ask, "tokenizer", registry, path="data.tokenizer", name=name)
    if answers["tokens"] is None:
        steps = base.train.max_steps
        _, per_step = _steps_for(1, base)
        answer = ask(f"Token budget (50M, 1.5B, ...; Enter keeps the preset's {steps:,} steps ="
                     f" {steps * per_step:,} tokens)", "")
        while answer:
            try:
                answers["tokens"] = parse_tokens(answer)
                break
            except Phase7Error as exc:
                print(f"  {exc}")
                answer = ask("Token budget", "")
    if answers["output"] is None:
        while True:
            out = Path(ask("Output file", DEFAULT_OUTPUT))
            if out.exists() and not answers["force"]:
                if ask(f"{out} exists; overwrite? (y/N)", "n").lower() not in ("y", "yes"):
                    continue
                answers["force"] = True
            answers["output"] = out
            break
    return answers


# ------------------------------------------------------------------------- command
def cmd_new(args, plugins) -> int:
    """``phase7fw recipe new``: flags answer the questions; the rest are asked (or an error)."""
    registry = plugins.registry
    output = args.output or args.recipe
    answers = {
        "preset": preset_path(args.preset) if args.preset else None,
        "sources": [parse_spec(s, "data_source", registry, with_weight=True) for s in args.source or []],
        "tokenizer": parse_spec(args.tokenizer, "tokenizer", registry, with_weight=False) if args.tokenizer else None,
        "tokens": parse_tokens(args.tokens) if args.tokens else None,
        "output": Path(output) if output else None,
        "force": args.force,
    }
    missing = [flag for flag, key in (("--preset", "preset"), ("--source", "sources"), ("--output", "output"))
               if not answers[key]]
    if missing and (args.interactive or sys.stdin.isatty()):
        answers = interactive(args, plugins, answers)
    elif missing:
        raise Phase7Error(
            f"recipe new: missing {', '.join(missing)} and stdin is not a terminal, so the wizard cannot ask;"
            " pass them (e.g. --preset phase7_tiny --source python_stdlib:1.0 --output my.toml) or add"
            " --interactive to answer the questions from stdin"
        )
    if not answers["sources"]:
        raise Phase7Error("recipe new: the recipe needs at least one data source")
    for i, table in enumerate(answers["sources"]):
        check_source(table, registry, f"--source {i + 1}")
    body, notes = build_recipe(preset=answers["preset"], sources=answers["sources"], tokenizer=answers["tokenizer"],
                               tokens=answers["tokens"], output=answers["output"], plugins=plugins)
    recipe = write_recipe(body, notes, answers["output"], plugins, force=answers["force"])
    _, per_step = _steps_for(1, recipe)
    mix = ", ".join(f"{s.name} {s.weight:g}" for s in recipe.data.sources)
    print(f"wrote {answers['output']}: valid (model {recipe.model.name}, {recipe.train.max_steps:,} steps ="
          f" {recipe.train.max_steps * per_step:,} tokens; tokenizer {recipe.data.tokenizer.name}; mix {mix})")
    print(f"next: phase7fw data prepare {answers['output']} && phase7fw run {answers['output']}")
    return 0

