"""The benchmark harness behind ``cortex bench SUITE [TARGETS...] [--quick] [--seeds N] [-o DIR]``.

A suite is a registered component of kind ``bench``. It measures and returns a
[`SuiteResult`][cortex.bench.harness.SuiteResult]; the harness writes ``report.md``, ``results.json``
and the PNG plots, recording the exact command, versions, machine, threads and seeds.
Benchmarks are not tests: figures are ratios against a reference run side by side.
"""

from __future__ import annotations

import difflib
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import BuildContext, Component


@dataclass
class Check:
    """A target a figure must meet, e.g. ``core/reference >= 0.95``."""

    name: str
    value: float
    target: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


@dataclass
class SuiteResult:
    """What a suite measured: JSON figures, tables, targets, plots and notes."""

    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    plots: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib Figure
    notes: list[str] = field(default_factory=list)


class BenchSuite(Component):
    """Base of benchmark suites; ``run`` measures ``targets`` (manifests or run directories)."""

    kind: ClassVar[str] = "bench"
    #: targets measured when the command names none
    default_targets: ClassVar[tuple[str, ...]] = ()

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        raise NotImplementedError


def load_target(target: Path, device: str = "cpu") -> Any:
    """The model of a bench target on ``device``: a run directory (trained) or a manifest (built untrained)."""
    from cortex.assembly import assemble
    from cortex.kernel.manifest import load_manifest
    from cortex.runtime.rundir import load_run

    return load_run(target, device=device) if Path(target).is_dir() else assemble(load_manifest(target), device=device)


def median_and_spread(values: list[float]) -> dict[str, float]:
    """Median, mean and standard deviation of repeated measurements."""
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _markdown_table(title: str, columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_report(suite: str, command: list[str], meta: dict[str, Any], result: SuiteResult) -> str:
    """The Markdown report of one suite run."""
    out = [f"# cortex bench {suite}", "", f"Command: `{' '.join(command)}`", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    out += [_markdown_table(*t) for t in result.tables]
    if result.checks:
        out += ["### Targets", "", "| check | value | target | result |", "|---|---|---|---|"]
        for c in result.checks:
            op = ">=" if c.higher_is_better else "<="
            out.append(f"| {c.name} | {c.value:.4g} | {op} {c.target:g} | {'met' if c.passed else 'MISSED'} |")
        out.append("")
    out += [f"![{name}]({name})\n" for name in result.plots]
    if result.notes:
        out += ["### Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(out)


def suite_settings(cls: Any, items: list[str]) -> Any:
    """``cls.Settings`` with ``NAME=VALUE`` items applied (lists comma-separated; numbers such
    as ``1e6`` are read as numbers); a bad item is a ``CortexError`` naming it."""
    def value(text: str) -> Any:
        for kind in (int, float):
            try:
                x = kind(text)
                return int(x) if isinstance(x, float) and x.is_integer() else x
            except ValueError:
                pass
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)

    fields = cls.Settings.model_fields
    given: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise CortexError(f"--set {item}: use NAME=VALUE with NAME one of {', '.join(fields)}")
        is_list = "list" in str(fields[name].annotation)
        given[name] = [value(x) for x in text.split(",") if x] if is_list else value(text)
    try:
        return cls.Settings(**given)
    except ValueError as e:
        raise CortexError(f"--set {' '.join(items)}: {e}") from None


def run_suite(suite: str, targets: list[Path], *, quick: bool, seeds: int, out_dir: Path,
              command: list[str], console: Any = None, settings: list[str] = ()) -> Path:
    """Run suite ``suite`` and write its report into ``out_dir``; return the report's path."""
    from cortex.kernel.plugins import create_plugin_manager
    from cortex.runtime.rundir import atomic_write, environment, write_json

    pm = create_plugin_manager()
    info = pm.registry.get("bench", suite)
    if info is None:
        names = pm.registry.names("bench")
        hint = difflib.get_close_matches(suite, names, n=1)
        tip = f"did you mean {hint[0]!r}?" if hint else f"available: {', '.join(names) or 'none'}"
        raise CortexError(f"unknown bench suite {suite!r}; {tip}")
    runner: BenchSuite = info.cls(suite_settings(info.cls, list(settings)), BuildContext())
    targets = targets or [Path(t) for t in runner.default_targets]
    for target in targets:
        if not target.exists():
            raise CortexError(f"{target}: no such manifest or run directory")
    seed_list = list(range(seeds))
    log = console.log if console is not None else (lambda msg: None)
    started = time.time()
    result = runner.run(targets, quick=quick, seeds=seed_list, log=log)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": round(time.time() - started, 1),
        "quick": quick,
        "seeds": seed_list,
        "targets": [str(t) for t in targets],
        **environment(),
    }
    out_dir = Path(out_dir) / suite
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, figure in result.plots.items():
        figure.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    report = out_dir / "report.md"
    atomic_write(report, render_report(suite, command, meta, result))
    write_json(out_dir / "results.json", {
        "suite": suite, "command": command, **meta, "figures": result.figures,
        "checks": [{**asdict(c), "passed": c.passed} for c in result.checks], "notes": result.notes,
    })
    return report
