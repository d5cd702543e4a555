"""``cortex bench ablate MANIFEST``: remove each component in turn and measure what changes.

Variants: the manifest as written, and one variant without each memory tier, plasticity
rule and feature (removing the last tier removes the memory system too). Every variant
runs the same measuring suites (``recall`` and ``facts`` by default) with the same seeds;
the report tabulates each metric per variant with its change from the full manifest. A
variant the remaining components refuse (a loss that needs a dense first tier, without it)
is named in the notes with the reason, and the others are measured.
With ``train_steps`` > 0 every variant is first trained that many steps on its manifest's
data; otherwise training-free effects are what is measured (said in the report).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, SuiteResult
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import BuildContext, Settings

SECTIONS = ("memory", "plasticity", "features")


def variants(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest and one copy without each component, keyed by what was removed."""
    out = {"full": manifest}
    for section in SECTIONS:
        for i, item in enumerate(manifest.get(section) or []):
            variant = copy.deepcopy(manifest)
            del variant[section][i]
            if section == "memory" and not variant["memory"]:
                variant.pop("memory_system", None)
                variant["model"] = {k: v for k, v in variant.get("model", {}).items() if k != "memory_layers"}
            out[f"without {section}[{i}] {item['type']}"] = variant
    return out


class Ablate(BenchSuite):
    """Each component's contribution to every measured metric."""

    name = "ablate"
    default_targets = ("examples/quickstart.yaml",)

    class Settings(Settings):
        suites: list[str] = Field(default_factory=lambda: ["recall", "facts"], description="Suites measured per variant.")
        train_steps: int = Field(0, ge=0, description="Training steps per variant before measuring (0: none).")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        from cortex.kernel.plugins import create_plugin_manager

        registry = create_plugin_manager().registry
        suites = ["recall"] if quick else self.settings.suites
        result = SuiteResult()
        for target in targets:
            if target.is_dir():
                raise CortexError(f"{target}: ablation needs a manifest (components are removed from it), not a run")
            manifest = yaml.safe_load(target.read_text(encoding="utf-8"))
            table: dict[str, dict[str, dict[str, float]]] = {}
            with tempfile.TemporaryDirectory() as tmp:
                for label, variant in variants(manifest).items():
                    path = Path(tmp) / f"variant{len(table)}.yaml"
                    variant = {**variant, "name": f"ablate-{len(table)}"}
                    if not self.settings.train_steps:
                        variant.pop("train", None)
                    path.write_text(yaml.safe_dump(variant, sort_keys=False), encoding="utf-8")
                    table[label] = {}
                    try:
                        measure_at = self._trained(path, Path(tmp), log) if self.settings.train_steps else path
                        for suite_name in suites:
                            info = registry.get("bench", suite_name)
                            settings = info.cls.Settings(**({"distances": [1], "trials": 2} if quick and
                                                             suite_name == "recall" else {}))
                            suite = info.cls(settings, BuildContext())
                            measured = suite.run([measure_at], quick=quick, seeds=seeds, log=log)
                            table[label].update(_flatten(suite_name, measured.figures, str(measure_at)))
                    except CortexError as exc:  # a variant the remaining components refuse: said, not fatal
                        if label == "full":
                            raise
                        result.notes.append(f"{label}: not measured ({str(exc).splitlines()[0]})")
                    log(f"{target}: measured {label}")
            full = table["full"]
            rows = []
            for metric in sorted(full):
                for label, values in table.items():
                    if metric in values:
                        delta = values[metric]["mean"] - full[metric]["mean"]
                        rows.append([metric, label, f"{values[metric]['mean']:.3f} ± {values[metric]['std']:.3f}",
                                     "" if label == "full" else f"{delta:+.3f}"])
            result.tables.append((f"Ablation of {target}", ["metric", "variant", "value", "change"], rows))
            result.figures[str(target)] = table
        result.notes.append("Variants are built untrained unless train_steps > 0: the table then shows what each "
                            "component does without training (training-free reads such as kNN-LM).")
        return result

    def _trained(self, manifest: Path, tmp: Path, log: Callable[[str], None]) -> Path:
        from cortex.assembly import assemble
        from cortex.kernel.manifest import load_manifest
        from cortex.runtime.rundir import save_run
        from cortex.runtime.train import train

        built = load_manifest(manifest)
        if built.manifest.train is None:
            raise CortexError(f"{manifest}: train_steps needs a `train:` section in the manifest")
        model = assemble(built)
        run = save_run(model, tmp / "runs")
        train(model, run, built.manifest.train, steps=self.settings.train_steps)
        log(f"trained {manifest.name} for {self.settings.train_steps} steps")
        return run


def _flatten(suite: str, figures: dict[str, Any], target: str) -> dict[str, dict[str, float]]:
    """``{"recall:passkey:knn_lm:1": {"mean": .., "std": ..}}`` from a suite's figures."""
    out = {}
    for key, figure in figures.items():
        name = key.replace(f"{target}:", "").replace(target, "")
        if isinstance(figure, dict) and "mean" in figure:
            out[f"{suite}:{name}"] = figure
        elif isinstance(figure, dict):
            for metric, value in figure.items():
                if isinstance(value, dict) and "mean" in value:
                    out[f"{suite}:{name + ':' if name else ''}{metric}"] = value
    return out


@hookimpl
def cortex_register_components(register):
    register(Ablate)
