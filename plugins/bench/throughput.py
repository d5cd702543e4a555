"""``cortex bench throughput``: training tokens/s of each manifest against the reference GPT.

For every target the suite builds the model and the frozen
[`ReferenceGPT`][cortex.bench.reference.ReferenceGPT] of the same shape (equal parameter counts
apart from the reference's position table, asserted), then times both through the same
[`train_step`][cortex.runtime.step.train_step] in alternating rounds — fp32 and bf16 autocast —
and reports medians and their ratio.

Generation tokens/s (KV cache, greedy) is timed the same way, every target in alternating
rounds. A model with memory first remembers demo-corpus text in the session it generates in,
and the prompt is the start of that text, so every token reads tiers that hold entries (its
kNN-LM read per token, also under ``lm_recalled_only``, or kNN-attention) and some reads match.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult, load_target, median_and_spread
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import Settings
from cortex.kernel.lazy import torch

#: core tokens/s must be at least this share of the reference's
CORE_TARGET = 0.95
#: a manifest with memory must keep this share of the first (plain) target's training tokens/s
MEMORY_TARGET = 0.9
#: ... and this share of its generation tokens/s
MEMORY_GENERATION_TARGET = 0.8
#: tokens of demo text a model with memory remembers before its generation is timed
REMEMBERED_TOKENS = 2000


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(model, optimizer, batches: list[torch.Tensor], hook, precision: str) -> float:
    from cortex.runtime.step import train_step

    device = batches[0].device.type
    _synchronize(device)
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        train_step(model, optimizer, [batch], step=step, hook=hook, precision=precision)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return sum(b[:, :-1].numel() for b in batches) / elapsed


class Throughput(BenchSuite):
    """Training and generation speed, side by side with the reference GPT."""

    name = "throughput"
    default_targets = ("examples/minimal.yaml",)

    class Settings(Settings):
        rounds: int = Field(15, ge=5, description="Alternating rounds per model (median taken).")
        steps: int = Field(2, gt=0, description="Training steps timed per round.")
        batch: int = Field(8, gt=0, description="Sequences per step.")
        device: Literal["cpu", "cuda"] = Field("cpu", description="Where every model runs (cuda: timed with synchronisation).")
        compile: bool = Field(False, description="`torch.compile` every core and reference before timing (warm-up compiles).")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        s = self.settings
        rounds, steps = (5, 2) if quick else (s.rounds, s.steps)
        result = SuiteResult()
        rows = []
        names = [str(t) for t in targets]
        for precision in ("fp32", "bf16"):
            tps: dict[str, list[float]] = {}
            paired: dict[tuple[str, str], list[float]] = {}  # (model, baseline) -> per-seed median of round ratios
            for seed in seeds:
                runs = self._contenders(targets, seed, log)
                gen = torch.Generator().manual_seed(seed)
                batches = {
                    name: [torch.randint(0, vocab, (s.batch, context + 1), generator=gen).to(s.device)
                           for _ in range(steps)]
                    for name, (_, _, _, (vocab, context)) in runs.items()
                }
                for name, (net, opt, hook, _) in runs.items():  # warm-up
                    _time_steps(net, opt, batches[name][:1], hook, precision)
                measured: dict[str, list[float]] = {name: [] for name in runs}
                order = list(runs)
                for r in range(rounds):
                    for name in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                        net, opt, hook, _ = runs[name]
                        measured[name].append(_time_steps(net, opt, batches[name], hook, precision))
                for name, values in measured.items():
                    tps.setdefault(name, []).append(median_and_spread(values)["median"])
                for name in names:  # ratios within each round cancel load that drifts between rounds
                    for baseline in (f"reference GPT for {name}", names[0]):
                        ratios = [a / b for a, b in zip(measured[name], measured[baseline])]
                        paired.setdefault((name, baseline), []).append(median_and_spread(ratios)["median"])
                log(f"{precision} seed {seed}: " + ", ".join(
                    f"{n} {tps[n][-1]:.0f} tok/s" for n in measured))
            for name in names:
                reference = f"reference GPT for {name}"
                vs_ref, vs_first = paired[(name, reference)], paired[(name, names[0])]
                figure = {
                    "tokens_per_s": median_and_spread(tps[name]),
                    "reference_tokens_per_s": median_and_spread(tps[reference]),
                    "vs_reference": median_and_spread(vs_ref),
                    "vs_first_target": median_and_spread(vs_first),
                    "batch": s.batch, "rounds": rounds, "steps_per_round": steps, "device": s.device,
                    "compile": s.compile,
                }
                result.figures[f"{name}:{precision}"] = figure
                rows.append([name, precision, round(figure["tokens_per_s"]["mean"]),
                             round(figure["reference_tokens_per_s"]["mean"]),
                             f"{figure['vs_reference']['mean']:.3f} ± {figure['vs_reference']['std']:.3f}",
                             f"{figure['vs_first_target']['mean']:.3f} ± {figure['vs_first_target']['std']:.3f}"])
                if self._plain[name]:
                    result.checks.append(Check(f"{name} {precision} core/reference",
                                               figure["vs_reference"]["mean"], CORE_TARGET))
                elif name != names[0] and self._plain[names[0]]:
                    result.checks.append(Check(f"{name} {precision} vs {names[0]}",
                                               figure["vs_first_target"]["mean"], MEMORY_TARGET))
        generation = self._generation(targets, rounds, seeds, log)
        for name in names:
            figure = result.figures[f"{name}:generate"] = generation[name]
            rows.append([name, "generate (KV cache)", round(figure["tokens_per_s"]["mean"]), "", "",
                         f"{figure['vs_first_target']['mean']:.3f} ± {figure['vs_first_target']['std']:.3f}"])
            if name != names[0] and self._plain[names[0]] and not self._plain[name]:
                result.checks.append(Check(f"{name} generation vs {names[0]}",
                                           figure["vs_first_target"]["mean"], MEMORY_GENERATION_TARGET))
        result.tables.append((
            "Training tokens/s (median of alternating rounds; mean ± std over seeds)",
            ["target", "precision", "tok/s", "reference tok/s", "vs reference", f"vs {names[0]}"], rows,
        ))
        result.plots["throughput.png"] = self._plot(result.figures)
        result.notes.append(
            "Every model runs the same train_step on random batches of its own shape, in rounds that "
            "rotate which model goes first; a ratio is the median over rounds of the ratio within a round. The reference GPT has the core's parameters (its position "
            "table aside); memory modules are not counted in that comparison. Generation: greedy, "
            f"with the KV cache, every target in the same alternating rounds; a model with memory first "
            f"remembers {REMEMBERED_TOKENS} tokens of demo text and starts from the start of that text."
        )
        return result

    def _contenders(self, targets: list[Path], seed: int, log: Callable[[str], None]) -> dict:
        """name -> (model, optimizer, hook relay, (vocab, context)) for every target and its reference."""
        from cortex.bench.reference import ReferenceGPT, comparable_parameters
        from cortex.runtime.step import make_optimizer

        runs: dict = {}
        self._plain = {}
        for target in targets:
            torch.manual_seed(seed)
            model = load_target(target, self.settings.device)
            model.train()
            config = model.config
            reference = ReferenceGPT(config).to(self.settings.device)
            if self.settings.compile:
                model.core.compile()
                reference.compile()
            core_params = sum(p.numel() for n, p in model.core.named_parameters() if ".memory." not in n)
            if core_params != comparable_parameters(reference):
                raise CortexError(f"{target}: core and reference differ in parameters "
                                  f"({core_params} vs {comparable_parameters(reference)})")
            shape = (config.vocab_size, config.context)
            runs[str(target)] = (model, make_optimizer(model, lr=1e-4), model.pm.hook, shape)
            runs[f"reference GPT for {target}"] = (reference, make_optimizer(reference, lr=1e-4), None, shape)
            self._plain[str(target)] = not model.components
        return runs

    def _generation(self, targets: list[Path], rounds: int, seeds: list[int],
                    log: Callable[[str], None]) -> dict[str, dict]:
        """name -> generation ``tokens_per_s`` and ``vs_first_target`` (mean ± std over seeds)."""
        from cortex_plugins.bench.recall import filler

        names = [str(t) for t in targets]
        tps: dict[str, list[float]] = {name: [] for name in names}
        paired: dict[str, list[float]] = {name: [] for name in names}
        for seed in seeds:
            runs = {}
            for target in targets:
                torch.manual_seed(seed)
                model = load_target(target, self.settings.device).eval()
                texts = filler(REMEMBERED_TOKENS, model.tokenizer, seed)
                if model.memory_system is not None:
                    for text in texts:
                        model.remember(text)
                    # every token reads memory, as a prompt about told text does (the prompt
                    # here is token ids, which no feature reads told text for)
                    model.memory_system.settings.lm_recalled_only = False
                length = min(32, model.config.context // 2)  # leaves room to generate in a small context
                prompt = torch.tensor([model.tokenizer.encode(texts[0])[:length]], dtype=torch.long,
                                      device=self.settings.device)
                new = min(64, model.config.context - prompt.shape[1])
                model.generate(prompt, 4, temperature=0.0)  # warm-up
                runs[str(target)] = (model, prompt, new)
            measured: dict[str, list[float]] = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    model, prompt, new = runs[name]
                    _synchronize(self.settings.device)
                    start = time.perf_counter()
                    model.generate(prompt, new, temperature=0.0)
                    _synchronize(self.settings.device)
                    measured[name].append(new / (time.perf_counter() - start))
            for name in names:
                tps[name].append(median_and_spread(measured[name])["median"])
                ratios = [a / b for a, b in zip(measured[name], measured[names[0]])]
                paired[name].append(median_and_spread(ratios)["median"])
            log(f"generation seed {seed}: " + ", ".join(f"{n} {tps[n][-1]:.0f} tok/s" for n in names))
        return {name: {"tokens_per_s": median_and_spread(tps[name]), "vs_first_target": median_and_spread(paired[name]),
                       "remembered_tokens": REMEMBERED_TOKENS if runs[name][0].memory_system is not None else 0}
                for name in names}

    @staticmethod
    def _plot(figures: dict):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in figures if "vs_reference" in figures[k]]
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(keys)), 3))
        xs = range(len(keys))
        core = [figures[k]["tokens_per_s"]["mean"] for k in keys]
        ref = [figures[k]["reference_tokens_per_s"]["mean"] for k in keys]
        ax.bar([x - 0.2 for x in xs], core, 0.4, label="manifest")
        ax.bar([x + 0.2 for x in xs], ref, 0.4, label="reference GPT")
        ax.set_xticks(list(xs), [k.replace(":", "\n") for k in keys], fontsize=7)
        ax.set_ylabel("training tokens/s")
        ax.legend()
        return fig


@hookimpl
def cortex_register_components(register):
    register(Throughput)
