"""The ``cortex`` command line. A user's mistake prints a message and exits 1, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from cortex.kernel import VERSION
from cortex.kernel.errors import CortexError

console = Console()
err_console = Console(stderr=True)


def _print_table(table: Table) -> None:
    """Print ``table`` whole: on a file or pipe (80 columns by default) a table never cuts a
    name; it is as wide as its content."""
    (console if console.is_terminal else Console(file=console.file, width=10_000)).print(table)


class _Group(TyperGroup):
    """Turns a [`CortexError`][cortex.kernel.errors.CortexError], and any exception raised inside a
    component's method, into a clean message and exit code 1; the traceback only with
    ``--traceback`` or ``CORTEX_DEBUG=1``."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CortexError as exc:
            _fail(exc, str(exc))
        except Exception as exc:
            message = component_failure(exc)
            if message is None:
                raise  # not a plugin's: a bug of Cortex itself, shown in full
            _fail(exc, message + "\n(a bug in that plugin: report it to its authors; `cortex --traceback ...` "
                                 "or CORTEX_DEBUG=1 shows the full traceback)")


def _debugging() -> bool:
    return _options.get("traceback", False) or os.environ.get("CORTEX_DEBUG", "").strip() not in ("", "0")


def _fail(exc: BaseException, message: str) -> None:
    if _debugging():
        err_console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False, soft_wrap=True)
    err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(code=1) from None


def component_failure(exc: BaseException) -> str | None:
    """What failed when ``exc`` was raised inside a method of a component (the innermost one
    on its traceback): its manifest entry, its package and version, and the method; ``None``
    when no component's code was running."""
    from cortex.kernel.interfaces import Component
    from cortex.kernel.plugins import create_plugin_manager

    found, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Component):
            found = (owner, tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    if found is None:
        return None
    component, method = found
    info = next((i for i in create_plugin_manager(strict=False).registry if i.cls is type(component)), None)
    source = info.source.describe() if info is not None else f"module {type(component).__module__}"
    return (f"{component.key}: {type(component).__qualname__}.{method} from {source} failed: "
            f"{type(exc).__name__}: {exc}")


def _typer(help: str) -> typer.Typer:
    return typer.Typer(cls=_Group, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, rich_markup_mode=None)


app = _typer("Build, train and measure small language models with brain-inspired memory.")
tokenizer_app = _typer("Train tokenizers.")
data_app = _typer("Prepare training data.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
plugin_app = _typer("Create plugin packages.")
app.add_typer(plugin_app, name="plugin")


def _version(value: bool) -> None:
    if value:
        console.print(f"cortex {VERSION}")
        raise typer.Exit()


_options: dict[str, bool] = {}


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    show_traceback: bool = typer.Option(False, "--traceback", help="On an error, print the full traceback too "
                                                                   "(also CORTEX_DEBUG=1)."),
) -> None:
    """Build, train and measure small language models with brain-inspired memory."""
    _options["traceback"] = show_traceback


def _output_folder(path: Path) -> Path:
    """``path`` as a folder to write into (made later): checked before any work starts."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise CortexError(f"{path}: {part} is a file, not a folder — choose another -o/--output")
            break
    return path


def _output_file(path: Path) -> Path:
    """``path`` as a file to write: its folder must exist and it must not be a folder."""
    if path.is_dir():
        raise CortexError(f"{path}: is a folder — give a file name with -o/--output")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise CortexError(f"{path}: the folder {path.parent} {what} — create it first or choose another -o")
    return path


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['name']}: {summary['parameters']:,} parameters", show_lines=False)
    table.add_column("part")
    table.add_column("name")
    table.add_column("details")
    table.add_column("source")
    m = summary["model"]
    table.add_row("core", "transformer",
                  f"dim {m['dim']}, layers {m['layers']}, heads {m['heads']}, context {m['context']}, "
                  f"vocab {m['vocab_size']}, memory layers {m['memory_layers'] or 'none'}", "cortex")
    tok = summary["tokenizer"]
    table.add_row("tokenizer", tok["type"], f"fingerprint {tok['fingerprint'][:12]}", "cortex")
    for section, rows in summary["components"].items():
        for row in rows:
            details = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("key", "name", "source"))
            table.add_row(section, row["name"], details, row["source"])
    return table


@app.command()
def build(
    manifest: Path = typer.Argument(..., help="The manifest YAML file."),
    output: Path = typer.Option(Path("runs"), "-o", "--output", help="Directory that receives the run directory."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the manifest's `name`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run of the same name."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Change a manifest value: KEY.PATH=VALUE, e.g. train.tokens=1000000 (repeatable; recorded in the run's manifest)."),
    log: Optional[list[str]] = typer.Option(None, "--log", help="Also log training to this logger, e.g. tensorboard or wandb (repeatable; adds to train.loggers)."),
) -> None:
    """Validate MANIFEST, assemble the model, print its summary and write a run directory.

    With a `train:` section the model is then trained into the run directory, which ends
    up holding the best model (by validation loss) with its checkpoints and metrics.
    The command holds the run directory's lock: another writer of the same run (build,
    train, chat) is refused with the holder's pid; readers (generate, memory) go on.
    """
    from cortex.assembly import assemble
    from cortex.runtime.manifests import load_manifest
    from cortex.runtime.rundir import run_lock, run_path, save_run

    _output_folder(output)
    built = load_manifest(manifest, overrides=overrides or [], loggers=log or [])
    dest = run_path(output, name or built.manifest.name)
    with run_lock(dest, "cortex build"):
        if dest.exists() and not overwrite:
            raise CortexError(f"{dest} already exists; pass --overwrite or choose another --name")
        settings = built.manifest.train
        device = "cpu"
        if settings is not None:
            from cortex.runtime.train import resolve_device

            device = resolve_device(settings.device)
        model = assemble(built, device=device)
        for problem in built.plugins.warnings:
            err_console.print(Text.assemble(("warning: ", "yellow"), problem), highlight=False, soft_wrap=True)
        console.print(_summary_table(model.summary()))
        path = save_run(model, output, name=dest.name, overwrite=overwrite)
        console.print(f"run directory: {path}")
        if settings is not None:
            _train_into(model, path, settings)


def _train_into(model: Any, path: Path, settings: Any, **options: Any) -> None:
    from cortex.runtime.train import train

    try:
        summary = train(model, path, settings, console=console, **options)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; continue with `cortex train {path} --resume auto`")
        raise typer.Exit(code=130) from None
    except CortexError as exc:
        raise CortexError(f"{exc}\nthe run directory {path} is kept, with its last checkpoint if any: fix the "
                          f"cause, then `cortex train {path} --resume auto` (or build again with --overwrite)") from None
    from cortex.runtime import distributed

    if distributed.is_main():
        val = summary["best_val_loss"]
        console.print(
            f"trained {summary['steps']} steps ({summary['tokens']:,} tokens, {summary['precision']}, "
            f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['elapsed_s']:.0f} s); "
            + (f"best validation loss {val:.4f} at step {summary['best_step']}" if val is not None
               else f"final loss {summary['loss']:.4f}")
        )
        console.print(f"model: {path}  (try `cortex generate {path} --prompt ...`, `cortex plot {path}`)")
    distributed.finish()  # under torchrun: every rank leaves together, past gloo's exit-time abort


@app.command("train")
def train_command(
    target: Path = typer.Argument(..., help="A manifest (builds a new run directory first) or a run directory."),
    data: Optional[str] = typer.Option(None, "--data", help="Data source name, .jsonl/.txt file, Hugging Face dataset folder or prepared dataset folder; overrides train.data."),
    resume: Optional[str] = typer.Option(None, "--resume", help="`auto` (the run's latest checkpoint) or a checkpoint folder."),
    output: Path = typer.Option(Path("runs"), "-o", "--output", help="Directory that receives a manifest's run directory."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimiser steps (default: train.tokens / (batch x context))."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run built from the same manifest."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Change a value of MANIFEST: KEY.PATH=VALUE (repeatable; a new run only)."),
    log: Optional[list[str]] = typer.Option(None, "--log", help="Also log training to this logger, e.g. tensorboard or wandb (repeatable; adds to train.loggers)."),
) -> None:
    """Train a run directory, or build MANIFEST into a new one and train it.

    Holds the run directory's lock while it trains (see `cortex build`).
    """
    from cortex.runtime.manifests import load_manifest
    from cortex.runtime.rundir import run_lock, run_path

    if target.is_dir():
        if overrides:
            raise CortexError("--set changes a manifest being built; a run directory keeps its own manifest")
        run = target
    elif target.is_file():
        run = run_path(_output_folder(output), load_manifest(target, overrides=overrides or []).manifest.name)
    else:
        raise CortexError(f"{target}: no such manifest file or run directory")
    with run_lock(run, "cortex train"):
        _train_command(target, data, resume, output, steps, overwrite, overrides or [], log or [])


def _train_command(target: Path, data: str | None, resume: str | None, output: Path, steps: int | None,
                   overwrite: bool, overrides: list[str], log: list[str]) -> None:
    from cortex.assembly import assemble
    from cortex.kernel.manifest import TrainSection
    from cortex.runtime.manifests import load_manifest
    from cortex.runtime.rundir import load_run, run_path, save_run
    from cortex.runtime.train import resolve_device

    if target.is_dir():
        run = target
        if not (run / "manifest.yaml").is_file():
            raise CortexError(f"{run}: not a run directory (no manifest.yaml); pass a manifest or a run directory")
        settings = load_manifest(run / "manifest.yaml", loggers=log).manifest.train or TrainSection()
        model = load_run(run, device=str(resolve_device(settings.device)))
    elif target.is_file():
        from cortex.runtime import distributed

        built = load_manifest(target, overrides=overrides, loggers=log)
        settings = built.manifest.train or TrainSection()
        device = resolve_device(settings.device)
        main = distributed.init_from_env(device).main  # under torchrun only rank 0 writes the run
        run = run_path(output, built.manifest.name)
        exists = run.exists()
        distributed.barrier()
        if exists and resume is not None and not overwrite:
            model = load_run(run, device=str(device))
        elif exists and not overwrite:
            raise CortexError(f"{run} already exists; continue it with `cortex train {run} --resume auto`, "
                              "or pass --overwrite to start again")
        else:
            model = assemble(built, device=device)
            if main:
                console.print(_summary_table(model.summary()))
                save_run(model, output, name=run.name, overwrite=overwrite)
                console.print(f"run directory: {run}")
            distributed.barrier()
    else:
        raise CortexError(f"{target}: no such manifest file or run directory")
    _train_into(model, run, settings, data=data, resume=resume, steps=steps)


class _StopGeneration(Exception):
    pass


@app.command()
def generate(
    run: Path = typer.Argument(..., help="The run directory."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample from the k likeliest tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed: the same seed gives the same text."),
) -> None:
    """Continue PROMPT with the run's model, streaming tokens as they come (KV cache)."""
    import torch

    from cortex.runtime.rundir import load_run

    if top_p is not None and top_p <= 0:
        raise CortexError("--top-p must be in (0, 1]")
    model = load_run(run)
    tok = model.tokenizer
    ids = tok.encode(prompt) or [tok.eos_id]
    idx = torch.tensor([ids], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new: list[int] = []
    shown = [""]

    def emit(final: bool = False) -> None:
        text = tok.decode(new)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
        if len(text) > len(shown[0]) and text.startswith(shown[0]):
            console.print(text[len(shown[0]):], end="", markup=False, highlight=False, emoji=False, soft_wrap=True)
            console.file.flush()
            shown[0] = text

    def on_token(token: int) -> None:
        if token == tok.eos_id:
            raise _StopGeneration
        new.append(token)
        emit()

    console.print(prompt, end="", markup=False, highlight=False, emoji=False, soft_wrap=True, style="bold")
    generate_fn = model.generate if hasattr(model, "generate") else model.core.generate
    try:
        generate_fn(idx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    generator=generator, stream=on_token)
    except _StopGeneration:
        pass
    emit(final=True)
    console.print()


@app.command()
def plot(
    run: Path = typer.Argument(..., help="The run directory (or its metrics.jsonl)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG file (default: RUN/metrics.png)."),
) -> None:
    """Plot loss, validation loss, learning rate, tokens/s and plugin metrics to a PNG."""
    from cortex.bench.plot import plot_metrics

    console.print(f"plot: {plot_metrics(run, _output_file(output) if output else None)}")


@app.command()
def chat(
    run: Path = typer.Argument(..., help="A run directory."),
    session: str = typer.Option("self", "--session", help="Memory stream of this conversation."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens per answer at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 answers greedily."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    learn: bool = typer.Option(True, "--learn/--no-learn", help="Store each turn in memory."),
) -> None:
    """Talk to a model; it learns from every turn and keeps what it learnt in RUN.

    Reads lines from standard input (``/quit`` ends). After each turn the memory state is
    written back to RUN atomically, so a restart remembers the conversation. With
    `--learn` it holds the run directory's lock (see `cortex build`), so a training run
    or a second chat cannot overwrite what this one learns.
    """
    from cortex.runtime.rundir import load_run, run_lock, save_memory

    with run_lock(run, "cortex chat") if learn else contextlib.nullcontext():
        _chat(run, load_run(run).eval(), session, max_tokens, temperature, seed, learn, save_memory)


def _chat(run: Path, model: Any, session: str, max_tokens: int, temperature: float, seed: int | None,
          learn: bool, save_memory: Any) -> None:
    console.print(f"chatting with {run} (session {session!r}); /quit to leave", highlight=False)
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach _valid_text, not a crash
    for line in sys.stdin:
        prompt = _valid_text(line.rstrip("\n"))
        if prompt.strip() in ("/quit", "/exit"):
            break
        if not prompt.strip():
            continue
        reply = model.chat(prompt, session=session, learn=learn, max_new_tokens=max_tokens,
                           temperature=temperature, seed=seed)
        console.print(Text(reply.text), highlight=False)
        err_console.print(f"  confidence {reply.confidence:.2f} · {reply.language}", highlight=False)
        if learn:
            save_memory(model, Path(run))


def _valid_text(line: str) -> str:
    """``line`` with bytes that were not UTF-8 (decoded as lone surrogates) replaced by U+FFFD."""
    try:
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:
        err_console.print("warning: input that is not UTF-8 was replaced by \ufffd", highlight=False)
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@app.command()
def memory(
    run: Path = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Per memory tier: entries, capacity, bytes of stored state, hit rate and consolidations."""
    from cortex.runtime.rundir import load_run

    model = load_run(run)
    if model.memory_system is None:
        raise CortexError(f"{run}: this model has no memory tiers")
    rows = [{"tier": tier.key, **tier.stats()} for tier in model.memory]
    if as_json:
        sys.stdout.write(json.dumps({"tiers": rows, "system": model.memory_system.summary()}, indent=2) + "\n")
        return
    columns = {"tier": "tier", "entries": "entries", "capacity": "capacity", "bytes": "bytes",
               "hit_rate": "hit rate", "consolidated_in": "in", "consolidated_out": "out", "evicted": "evicted"}
    table = Table(title=f"memory of {run}")
    for label in columns.values():
        table.add_column(label, no_wrap=True)
    for row in rows:
        table.add_row(*(f"{row.get(c, 0):.3f}" if c == "hit_rate" else str(row.get(c, "")) for c in columns))
    _print_table(table)


@app.command()
def validate(
    manifests: list[Path] = typer.Argument(..., help="Manifest files to check."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Check with this change: KEY.PATH=VALUE (repeatable)."),
) -> None:
    """Check manifests without building them; report every problem with FILE:LINE:COL."""
    from cortex.runtime.manifests import load_manifest

    failures = []
    for path in manifests:
        try:
            load_manifest(path, overrides=overrides or [])
            console.print(f"{path}: ok")
        except CortexError as exc:
            failures.append(str(exc))
    if failures:
        raise CortexError("\n".join(failures))


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file.")) -> None:
    """Print the manifest's JSON schema, with the settings of every registered component."""
    from cortex.runtime.manifests import json_schema
    from cortex.runtime.rundir import atomic_write

    if output:
        _output_file(output)
    text = json.dumps(json_schema(), indent=2)
    if output:
        atomic_write(output, text + "\n")
    else:
        sys.stdout.write(text + "\n")


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List installed plugins and their components; broken plugins are reported, not fatal."""
    from cortex.kernel.plugins import create_plugin_manager

    pm = create_plugin_manager(strict=False)
    rows = [
        {"name": i.name, "kind": i.kind, "distribution": i.source.distribution,
         "version": i.source.version, "entry_point": i.source.entry_point}
        for i in pm.registry
    ]
    if as_json:
        sys.stdout.write(json.dumps({"components": rows, "errors": [str(e) for e in pm.load_errors],
                                     "warnings": pm.warnings}, indent=2) + "\n")
        return
    table = Table(title="Cortex components")
    for column in ("name", "kind", "distribution", "version", "entry_point"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    _print_table(table)
    for problem in [*map(str, pm.load_errors), *pm.warnings]:
        err_console.print(Text.assemble(("warning: ", "yellow"), problem), highlight=False, soft_wrap=True)



def _answer(check: Any) -> Any:
    """A prompt's value check: a wrong answer is asked again instead of ending the command."""

    def proc(value: str) -> Any:
        try:
            return check(value)
        except (CortexError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None

    return proc


def _size_answer(value: str) -> str:
    if value.strip() not in _Size.__members__:
        raise ValueError(f"{value.strip()!r} is not a size; answer {', '.join(_Size.__members__)}")
    return value.strip()


class _Size(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"


@app.command()
def init(
    path: Optional[Path] = typer.Argument(None, help="Manifest file to write, or a folder (default: NAME.yaml here)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name, also the run directory's name."),
    memory: Optional[bool] = typer.Option(None, "--memory/--no-memory", help="Add short- and long-term memory tiers."),
    size: Optional[_Size] = typer.Option(None, "--size", help="Preset shape and training budget."),
    train: Optional[bool] = typer.Option(None, "--train/--no-train", help="Add a train: section, so `cortex build` trains."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Ask nothing: defaults for every answer not given."),
) -> None:
    """Write a commented first manifest that validates, from a few questions or flags.

    Without flags it asks for the name, size, memory and training; with any of them, or
    --yes, it asks nothing. It never overwrites a file.
    """
    from cortex.cli.scaffold import SIZE_HELP, InitOptions, check_run_name, init_manifest

    defaults = InitOptions(name=path.stem if path is not None and path.suffix else InitOptions.name)
    if not yes and name is None and memory is None and size is None and train is None:
        name = typer.prompt("Model name", default=defaults.name, value_proc=_answer(check_run_name))
        for key, text in SIZE_HELP.items():
            typer.echo(f"  {key}: {text}")
        size = typer.prompt(f"Size ({', '.join(SIZE_HELP)})", default=defaults.size,
                            value_proc=_answer(_size_answer))
        memory = typer.confirm("Add memory tiers (stm, ltm)?", default=defaults.memory)
        train = typer.confirm("Train on the bundled demo corpus when built?", default=defaults.train)
    options = InitOptions(
        name=defaults.name if name is None else name,
        size=defaults.size if size is None else _Size(size).value,
        memory=defaults.memory if memory is None else memory,
        train=defaults.train if train is None else train,
    )
    written = init_manifest(path if path is not None else Path(f"{options.name}.yaml"), options)
    console.print(f"wrote {written}")
    console.print(f"next: cortex validate {written}  then  cortex build {written}", highlight=False)


@plugin_app.command("new")
def plugin_new(
    name: str = typer.Argument(..., help="Plugin name: a lower-case Python identifier such as demo_tier; "
                                         "the package name and the namespace of its components."),
    output: Path = typer.Option(Path("."), "-o", "--output", help="Folder that receives the package folder NAME."),
) -> None:
    """Write a ready-to-install plugin package: pyproject with the entry point, a memory tier, tests.

    The package is written into a temporary folder and renamed into place; an existing
    folder is never touched.
    """
    from cortex.cli.scaffold import distribution_name, new_plugin, plugin_files

    dest = new_plugin(name, output)
    console.print(f"wrote {dest} ({distribution_name(name)}, components {name}.recent):")
    for file in plugin_files(name):
        console.print(f"  {dest / file}", highlight=False)
    console.print(f"next: pip install -e {dest}  then  cortex plugins  and  pytest {dest}", highlight=False)


@tokenizer_app.command("train")
def tokenizer_train(
    files: list[Path] = typer.Argument(..., help="JSONL ({\"text\": ...}) or plain-text files."),
    output: Path = typer.Option(Path("tokenizer.json"), "-o", "--output", help="Where to write tokenizer.json."),
    vocab_size: int = typer.Option(8000, "--vocab-size", min=1, help="Vocabulary size."),
) -> None:
    """Train a byte-level BPE tokenizer on FILES."""
    from cortex.runtime.bpe import train_bpe

    if not output.is_dir():
        _output_file(output)
    tok = train_bpe(list(files), vocab_size, output)
    console.print(f"{output}: {tok.vocab_size} tokens, fingerprint {tok.fingerprint[:12]}")


@data_app.command("prepare")
def data_prepare(
    inputs: list[str] = typer.Argument(..., help="JSONL or text files, Hugging Face dataset folders (needs cortex[hf]), or registered data sources such as `demo`."),
    output: Path = typer.Option(..., "-o", "--output", help="Dataset directory to create."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json (default: bytes)."),
    mix: Optional[str] = typer.Option(None, "--mix", help="Token shares, e.g. a.jsonl=0.4,b.jsonl=0.6."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", min=0.0, max=0.5, help="Share of documents held out."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Tokenizer processes."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed lines (counted) instead of failing."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/validation split."),
) -> None:
    """Tokenize INPUTS into a dataset directory of token memmaps with meta.json."""
    from cortex.runtime.data import documents_from_path, parse_mix, prepare
    from cortex.kernel.interfaces import BuildContext
    from cortex.kernel.plugins import create_plugin_manager
    from cortex.core.tokenizer import ByteTokenizer, load_tokenizer
    tok = load_tokenizer(tokenizer) if tokenizer else ByteTokenizer()
    weights = parse_mix(mix) if mix else {}
    unknown = set(weights) - set(inputs)
    if unknown:
        raise CortexError(f"--mix names {', '.join(sorted(unknown))}, which are not among the inputs")
    pm = create_plugin_manager()
    sources = []
    for item in inputs:
        path = Path(item)
        found = pm.registry.reader_of(path) if path.is_dir() else None
        if found is not None:  # e.g. a Hugging Face dataset folder, read by the hf source
            info, settings = found
            if "skip_bad" in type(settings).model_fields:
                settings = settings.model_copy(update={"skip_bad": skip_bad})
            docs = info.cls(settings, BuildContext(tokenizer=tok)).documents()
        elif path.exists() or Path(item).suffix:
            docs = documents_from_path(path, skip_bad=skip_bad)
        else:
            info = pm.registry.get("data", item)
            if info is None:
                raise CortexError(f"{item}: no such file, and no data source of that name "
                                  f"(known: {', '.join(pm.registry.names('data'))})")
            docs = info.cls(info.cls.Settings(), BuildContext(tokenizer=tok)).documents()
        sources.append((item, docs, weights.get(item)))
    report = prepare(sources, output, tok, val_fraction=val_fraction, workers=workers, seed=seed,
                     skip_bad=skip_bad)
    console.print_json(data=report)


@app.command()
def bench(
    suite: str = typer.Argument(..., help="Suite: throughput, memory, recall, facts, reads, continual, ablate."),
    targets: Optional[list[Path]] = typer.Argument(None, help="Manifests or run directories to measure."),
    quick: bool = typer.Option(False, "--quick", help="Small, fast settings (a few minutes at most)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Repeat over this many seeds; mean ± std."),
    output: Path = typer.Option(Path("bench-out"), "-o", "--output", help="Report directory."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="A setting of the suite, NAME=VALUE "
                                                 "(lists comma-separated), e.g. --set sizes=1e6,3e6,1e7."),
) -> None:
    """Run a benchmark suite and write report.md, results.json and plots to the output directory."""
    from cortex.bench.harness import run_suite

    _output_folder(output)
    report = run_suite(suite, list(targets or []), quick=quick, seeds=seeds, out_dir=output,
                       command=["cortex", *_invocation], console=console, settings=settings or [])
    console.print(f"report: {report}")


_invocation: list[str] = []


def add_plugin_commands(plugins: Any = None) -> None:
    """Let every plugin of ``plugins`` (default: all installed) add its commands through
    ``cortex_register_commands``, once per process."""
    if not _plugin_commands:
        from cortex.kernel.plugins import create_plugin_manager

        pm = plugins if plugins is not None else create_plugin_manager(strict=False)
        pm.hook.cortex_register_commands(app=app)
        _plugin_commands.append(True)


_plugin_commands: list[bool] = []


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cortex`` script."""
    _invocation[:] = sys.argv[1:] if argv is None else argv
    add_plugin_commands()
    app(args=argv, prog_name="cortex")


if __name__ == "__main__":  # `python -m cortex.cli.app ...`, e.g. under `torchrun -m cortex.cli.app train RUN`
    main()
