"""``cortex bench throughput``: training tokens/s of each manifest against the reference GPT.

For every target the suite builds the model and the frozen
[`ReferenceGPT`][cortex.reference.ReferenceGPT] of the same shape (equal parameter counts
apart from the reference's position table, asserted), then times both through the same
[`train_step`][cortex.step.train_step] in alternating rounds — fp32 and bf16 autocast —
and reports medians and their ratio. Generation tokens/s (KV cache) is reported too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from cortex import hookimpl
from cortex.bench import BenchSuite, Check, SuiteResult, median_and_spread
from cortex.errors import CortexError
from cortex.interfaces import Settings
from cortex.reference import ReferenceGPT, comparable_parameters
from cortex.step import make_optimizer, train_step

#: core tokens/s must be at least this share of the reference's
CORE_TARGET = 0.95


def load_target(target: Path):
    """Assemble the model of a manifest file or a run directory."""
    from cortex.assemble import assemble
    from cortex.manifest import load_manifest
    from cortex.rundir import load_run

    return load_run(target) if target.is_dir() else assemble(load_manifest(target))


def _time_steps(model, optimizer, batches: list[torch.Tensor], hook, precision: str) -> float:
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        train_step(model, optimizer, [batch], step=step, hook=hook, precision=precision)
    elapsed = time.perf_counter() - start
    return sum(b[:, :-1].numel() for b in batches) / elapsed


class Throughput(BenchSuite):
    """Training and generation speed, side by side with the reference GPT."""

    name = "throughput"
    default_targets = ("examples/minimal.yaml",)

    class Settings(Settings):
        rounds: int = Field(7, ge=5, description="Alternating rounds per model (median taken).")
        steps: int = Field(4, gt=0, description="Training steps timed per round.")
        batch: int = Field(8, gt=0, description="Sequences per step.")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        s = self.settings
        rounds, steps = (5, 2) if quick else (s.rounds, s.steps)
        result = SuiteResult()
        rows = []
        for target in targets:
            for precision in ("fp32", "bf16"):
                ratios, core_tps, ref_tps = [], [], []
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = load_target(target)
                    model.train()
                    config = model.config
                    reference = ReferenceGPT(config)
                    if comparable_parameters(model.core) != comparable_parameters(reference):
                        raise CortexError(
                            f"{target}: core and reference differ in parameters "
                            f"({comparable_parameters(model.core)} vs {comparable_parameters(reference)})"
                        )
                    gen = torch.Generator().manual_seed(seed)
                    batches = [
                        torch.randint(0, config.vocab_size, (s.batch, config.context + 1), generator=gen)
                        for _ in range(steps)
                    ]
                    runs = {
                        "core": (model, make_optimizer(model, lr=1e-4), model.pm.hook),
                        "reference": (reference, make_optimizer(reference, lr=1e-4), None),
                    }
                    for net, opt, hook in runs.values():  # warm-up
                        _time_steps(net, opt, batches[:1], hook, precision)
                    measured: dict[str, list[float]] = {"core": [], "reference": []}
                    for r in range(rounds):
                        order = ("core", "reference") if r % 2 == 0 else ("reference", "core")
                        for which in order:
                            measured[which].append(_time_steps(*runs[which][:2], batches, runs[which][2], precision))
                    core_m = median_and_spread(measured["core"])["median"]
                    ref_m = median_and_spread(measured["reference"])["median"]
                    core_tps.append(core_m)
                    ref_tps.append(ref_m)
                    ratios.append(core_m / ref_m)
                    log(f"{target} {precision} seed {seed}: core {core_m:.0f} tok/s, "
                        f"reference {ref_m:.0f} tok/s, ratio {core_m / ref_m:.3f}")
                ratio = median_and_spread(ratios)
                key = f"{target}:{precision}"
                result.figures[key] = {
                    "core_tokens_per_s": median_and_spread(core_tps),
                    "reference_tokens_per_s": median_and_spread(ref_tps),
                    "ratio": ratio,
                    "parameters": comparable_parameters(model.core),
                    "batch": s.batch, "context": config.context, "rounds": rounds, "steps_per_round": steps,
                }
                rows.append([str(target), precision, round(result.figures[key]["core_tokens_per_s"]["mean"]),
                             round(result.figures[key]["reference_tokens_per_s"]["mean"]),
                             f"{ratio['mean']:.3f} ± {ratio['std']:.3f}"])
                result.checks.append(Check(f"{target} {precision} core/reference", ratio["mean"], CORE_TARGET))
            gen_tps = self._generation(model)
            result.figures[f"{target}:generate"] = {"tokens_per_s": gen_tps}
            rows.append([str(target), "generate (KV cache)", round(gen_tps), "", ""])
        result.tables.append((
            "Training tokens/s (median of alternating rounds; mean over seeds)",
            ["target", "precision", "core tok/s", "reference tok/s", "core/reference"], rows,
        ))
        result.plots["throughput.png"] = self._plot(result.figures)
        result.notes.append(
            "Core and reference run the same train_step on the same random batches; "
            "rounds alternate which runs first."
        )
        return result

    @staticmethod
    def _generation(model) -> float:
        model.eval()
        prompt = torch.zeros(1, 8, dtype=torch.long)
        new = min(64, model.config.context - 8)
        model.core.generate(prompt, 4, temperature=0.0)
        start = time.perf_counter()
        model.core.generate(prompt, new, temperature=0.0)
        return new / (time.perf_counter() - start)

    @staticmethod
    def _plot(figures: dict):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in figures if "ratio" in figures[k]]
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(keys)), 3))
        xs = range(len(keys))
        core = [figures[k]["core_tokens_per_s"]["mean"] for k in keys]
        ref = [figures[k]["reference_tokens_per_s"]["mean"] for k in keys]
        ax.bar([x - 0.2 for x in xs], core, 0.4, label="cortex core")
        ax.bar([x + 0.2 for x in xs], ref, 0.4, label="reference GPT")
        ax.set_xticks(list(xs), [k.replace(":", "\n") for k in keys], fontsize=7)
        ax.set_ylabel("training tokens/s")
        ax.legend()
        return fig


@hookimpl
def cortex_register_components(register):
    register(Throughput)
