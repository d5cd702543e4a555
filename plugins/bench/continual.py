"""``cortex bench continual``: four fact tasks learned in sequence — how much is forgotten?

**The stream.** Per seed, ``tasks`` (4) tasks are generated offline from the seed: task
``t`` is a set of ``facts`` key -> value facts, a key being three lowercase letters (keys
are disjoint across tasks) and a value two digits, rendered ``abc=42;``. *Training
sequences* of a task are its facts in random order, concatenated after a ``;`` and cut to
the model's context. *Evaluation items* are single queries ``;abc=`` whose two digits the
model must predict (argmax, teacher-forced; both digits right = correct): a fact asked
alone, a string that never occurs as a training sequence. A task's accuracy is the share
of its facts answered correctly (chance: 1%). The model is read as it is, without its
memory tiers (evaluation passes no memory stream): what is measured is what the weights
— slow and fast — keep.

**The protocol.** Every configuration learns task 1, 2, 3, 4 in that order with the same
number of training steps per task (``steps``, batch ``batch``, AdamW at ``lr`` after a
short warm-up) through the kernel's [`train_step`][cortex.runtime.step.train_step] with the
model's hooks, so features act as they would in ``cortex train``. After each task every
task is evaluated: ``R[i, j]`` is the accuracy on task ``j`` after learning task ``i``.

**Metrics** (Avalanche's definitions, ``T`` tasks): average accuracy
``ACC = mean_j R[T-1, j]``; forgetting of task ``j`` = its accuracy right after it was
learned minus its final accuracy, ``R[j, j] - R[T-1, j]``, averaged over ``j < T-1``;
backward transfer ``BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])`` (= -forgetting). Mean ±
std over seeds.

**Configurations**, each built from the base manifest (the targets, or a built-in tiny
model) by adding features: ``plain`` (fine-tuning, the base as it is), ``sleep_wake``,
``cls`` and ``sleep_wake+cls``, with the suite's settings for those features,
``sleep_wake (REM generate)+cls``: the same with ``rem_mode: generate`` (REM replays the
model's own continuations of stored openings instead of recombined fragments), and
``sleep_wake+cls (defaults)``: the plugins' own defaults but for the sleep clock (a
1,000-step wake would never sleep in this stream). Sleep replay and CLS updates are
gradient steps *in addition* to the training steps; the report counts them.

**The equal-compute baseline** ``plain+replay``: plain fine-tuning plus uniform experience
replay — a reservoir of training rows like ``sleep_wake``'s (its ``buffer`` and
``record_rows``), from which batches of its ``replay_batch`` rows, drawn uniformly, take
extra steps of the training optimiser, spread evenly over the stream — given exactly as
many extra steps as ``sleep_wake+cls`` took with the same seed. (CLS fast-path updates
reuse the training step's gradient, so this baseline gets at least the same compute.)

The target: sleep-wake + CLS forgets at least 30% less than plain fine-tuning (mean over
seeds); the report puts it beside ``plain+replay``.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult
from cortex.kernel.interfaces import Settings
from cortex.kernel.lazy import torch, no_grad

#: sleep-wake + CLS must reduce forgetting by at least this share of plain fine-tuning's
TARGET_REDUCTION = 0.30

BASE_MANIFEST = """\
cortex: 1
name: continual
seed: 0
model: {dim: 64, layers: 2, heads: 2, context: 64}
tokenizer: {type: byte}
"""

CONFIGS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "sleep_wake": ("sleep_wake",),
    "cls": ("cls",),
    "sleep_wake+cls": ("cls", "sleep_wake"),
    "sleep_wake (REM generate)+cls": ("cls", "sleep_wake"),
    "sleep_wake+cls (defaults)": ("cls", "sleep_wake"),
    "plain+replay": (),
}
#: settings a configuration changes in the suite's settings of its features
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "sleep_wake (REM generate)+cls": {"sleep_wake": {"rem_mode": "generate"}},
}
#: the sleep_wake settings the ``(defaults)`` configuration keeps: the clock, scaled to the stream
CLOCK = ("wake", "nrem", "rem", "cycle", "ratios")


# --------------------------------------------------------------------------- the tasks


def make_tasks(seed: int, tasks: int, facts: int) -> list[list[tuple[str, str]]]:
    """``tasks`` lists of ``facts`` (key, value) pairs; keys unique across all tasks."""
    rng = random.Random(f"continual-{seed}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < tasks * facts:
        key = "".join(rng.choice(letters) for _ in range(3))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return [[(keys[t * facts + i], f"{rng.randrange(100):02d}") for i in range(facts)] for t in range(tasks)]


def training_batch(tokenizer: Any, task: list[tuple[str, str]], rows: int, length: int,
                   rng: random.Random) -> torch.Tensor:
    """``rows`` sequences of ``length`` tokens: the task's facts shuffled, after a ``;``."""
    out = []
    for _ in range(rows):
        ids: list[int] = tokenizer.encode(";")
        while len(ids) < length:
            order = list(task)
            rng.shuffle(order)
            ids += tokenizer.encode("".join(f"{k}={v};" for k, v in order))
        out.append(ids[:length])
    return torch.tensor(out, dtype=torch.long)


@no_grad
def accuracy(model: Any, tokenizer: Any, task: list[tuple[str, str]]) -> float:
    """Share of the task's facts whose value the model predicts from ``;key=`` alone."""
    prompts = [tokenizer.encode(f";{k}=") for k, _ in task]
    answers = [tokenizer.encode(v) for _, v in task]
    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), tokenizer.eos_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    device = next(model.core.parameters()).device
    was = model.training
    model.eval()
    try:
        logits, _ = model(idx[:, :-1].to(device))
    finally:
        model.train(was)
    pred = logits.argmax(-1).cpu()
    correct = 0
    for i, (p, a) in enumerate(zip(prompts, answers)):
        start = len(p) - 1  # the logit at the last prompt token predicts the first answer token
        correct += int(pred[i, start: start + len(a)].tolist() == a)
    return correct / len(task)


def metrics_of(R: list[list[float]]) -> dict[str, float]:
    """Average accuracy, backward transfer and forgetting (Avalanche) of an accuracy matrix."""
    T = len(R)
    acc = statistics.fmean(R[T - 1])
    if T < 2:
        return {"accuracy": acc, "bwt": 0.0, "forgetting": 0.0}
    drops = [R[j][j] - R[T - 1][j] for j in range(T - 1)]
    return {"accuracy": acc, "bwt": -statistics.fmean(drops), "forgetting": statistics.fmean(drops)}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _pm(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


# --------------------------------------------------------------------------- the suite


class Continual(BenchSuite):
    """Forgetting over a stream of four fact tasks: plain fine-tuning vs sleep-wake and CLS."""

    name = "continual"

    class Settings(Settings):
        tasks: int = Field(4, ge=2, description="Tasks in the stream.")
        facts: int = Field(16, ge=1, description="Facts per task.")
        steps: int = Field(100, ge=1, description="Training steps per task (every configuration).")
        batch: int = Field(16, ge=1, description="Sequences per training step.")
        lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the training steps.")
        warmup: int = Field(10, ge=0, description="Warm-up steps at the start of the stream.")
        quick_facts: int = Field(12, ge=1, description="Facts per task with --quick.")
        quick_steps: int = Field(60, ge=1, description="Training steps per task with --quick.")
        threads: int = Field(1, ge=1, description="torch threads while the suite runs.")
        sleep_wake: dict[str, Any] = Field(
            default_factory=lambda: {"wake": 10, "nrem": 5, "rem": 2, "lr": 1e-3, "replay_steps": 2,
                                     "replay_batch": 16, "buffer": 512, "record_rows": 2},
            description="Settings of the `sleep_wake` feature added to the base.")
        cls: dict[str, Any] = Field(
            default_factory=lambda: {"width": 32, "fast_lr": 3e-3, "slow_lr": 1e-3, "consolidation_steps": 8,
                                     "keep": 0.8, "slow_share": 0.5},
            description="Settings of the `cls` feature added to the base.")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        s = self.settings
        facts = s.quick_facts if quick else s.facts
        steps = s.quick_steps if quick else s.steps
        bases = [(str(t), t.read_text(encoding="utf-8")) for t in targets] or [("built-in base", BASE_MANIFEST)]
        threads = torch.get_num_threads()
        torch.set_num_threads(s.threads)  # tiny models: one thread is fastest, above all on a busy machine
        try:
            return self._run_all(bases, facts, steps, seeds, log)
        finally:
            torch.set_num_threads(threads)

    def _run_all(self, bases: list[tuple[str, str]], facts: int, steps: int, seeds: list[int],
                 log: Callable[[str], None]) -> SuiteResult:
        s = self.settings
        result = SuiteResult()
        result.figures["setup"] = {"tasks": s.tasks, "facts": facts, "steps_per_task": steps, "batch": s.batch,
                                   "lr": s.lr, "warmup": s.warmup, "seeds": seeds, "threads": s.threads,
                                   "sleep_wake": s.sleep_wake, "cls": s.cls}
        for base_name, base_text in bases:
            per_config: dict[str, dict[str, Any]] = {}
            for config, features in CONFIGS.items():
                runs = []
                for i, seed in enumerate(seeds):
                    started = time.perf_counter()
                    replay = per_config["sleep_wake+cls"]["runs"][i]["extra_steps"] if config == "plain+replay" else 0
                    run = self._run(base_text, features, seed, facts, steps, defaults=config.endswith("(defaults)"),
                                    replay=replay, overrides=OVERRIDES.get(config, {}))
                    run["seconds"] = time.perf_counter() - started
                    runs.append(run)
                    m = run["metrics"]
                    log(f"{base_name} {config} seed {seed}: accuracy {m['accuracy']:.3f}, forgetting "
                        f"{m['forgetting']:.3f} ({run['seconds']:.0f} s)")
                per_config[config] = self._summarise(runs)
            result.figures[base_name] = per_config
            self._report(base_name, per_config, result)
        result.notes += [
            f"Stream: {s.tasks} tasks x {facts} facts (`abc=42;`), {steps} training steps of {s.batch} sequences "
            f"per task for every configuration; AdamW lr {s.lr:g} (warm-up {s.warmup}). R[i, j]: accuracy on task j "
            "after learning task i, the model read without memory tiers.",
            "Forgetting (Avalanche): R[j, j] - R[T-1, j] averaged over all tasks but the last; BWT = -forgetting; "
            "accuracy: mean of the last row. Reduction = 1 - forgetting(config) / forgetting(plain), of the means.",
            "Sleep replay and CLS updates are gradient steps on top of the training steps (same training steps for "
            "every configuration); the `extra steps` column counts them per run. plain+replay is the equal-compute "
            "baseline: plain fine-tuning plus as many extra steps of the training optimiser, on batches drawn "
            "uniformly from a reservoir of training rows of sleep_wake's buffer size, as sleep_wake+cls took with "
            "the same seed, spread evenly over the stream.",
            "The suite's sleep_wake and cls settings are above; they differ from the plugin defaults because the "
            "stream is a few hundred steps: the sleep clock is scaled to it (a default wake of 1,000 steps never "
            "sleeps), and the learning rates, replay and consolidation amounts and cls keep / slow_share are set for "
            "so short a stream. `sleep_wake+cls (defaults)` shows the plugins' defaults with the suite's clock; "
            "`sleep_wake (REM generate)+cls` is sleep_wake+cls with `rem_mode: generate` (REM learns from the model's "
            "own continuations of stored openings).",
            f"torch ran on {s.threads} thread(s) during the suite (the `threads` above are the process default).",
        ]
        return result

    # ------------------------------------------------------------------ one run

    def _manifest(self, base_text: str, features: tuple[str, ...], seed: int, defaults: bool = False,
                  overrides: dict[str, dict[str, Any]] | None = None) -> str:
        data = yaml.safe_load(base_text)
        data["seed"] = int(data.get("seed", 0)) + seed
        data.pop("train", None)
        kept = [f for f in data.get("features") or [] if f.get("type") not in ("sleep_wake", "cls")]
        for name in features:
            settings = dict(getattr(self.settings, name))
            if defaults:
                settings = {k: v for k, v in settings.items() if name == "sleep_wake" and k in CLOCK}
            settings.update((overrides or {}).get(name, {}))
            kept.append({"type": name, "settings": settings})
        data["features"] = kept
        return yaml.safe_dump(data, sort_keys=False)

    def _run(self, base_text: str, features: tuple[str, ...], seed: int, facts: int, steps: int,
             defaults: bool = False, replay: int = 0,
             overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """One configuration learning the stream of ``seed``; ``replay`` > 0: that many extra
        steps of uniform experience replay, spread evenly over the stream; ``overrides``: settings
        changed per feature."""
        from cortex.runtime.step import make_optimizer, set_lr, train_step

        from cortex.assembly import assemble
        from cortex.kernel.manifest import load_manifest_text
        from cortex_plugins.cognition.sleep_wake import SleepWake

        s = self.settings
        model = assemble(load_manifest_text(self._manifest(base_text, features, seed, defaults, overrides),
                                            "continual.yaml"))
        tok = model.tokenizer
        tasks = make_tasks(seed, s.tasks, facts)
        optimizer = make_optimizer(model, s.lr, weight_decay=0.0)
        length = model.config.context + 1
        reservoir = Reservoir(SleepWake.Settings(**s.sleep_wake), random.Random(f"replay-{seed}"))
        total = s.tasks * steps
        model.train()
        R: list[list[float]] = []
        step = done = 0
        for t, task in enumerate(tasks):
            rng = random.Random(f"train-{seed}-{t}")
            for _ in range(steps):
                set_lr(optimizer, s.lr * min(1.0, (step + 1) / s.warmup) if s.warmup else s.lr)
                batch = training_batch(tok, task, s.batch, length, rng)
                train_step(model, optimizer, [batch], step=step, hook=model.pm.hook, precision="fp32")
                step += 1
                if replay and reservoir.capacity:
                    reservoir.add(batch)
                    while done < replay * step // total:  # the extra steps, evenly over the stream
                        train_step(model, optimizer, [reservoir.sample()], step=step, precision="fp32")
                        done += 1
            R.append([accuracy(model, tok, other) for other in tasks])
        extra = done
        for feature in model.features:
            st = feature.stats()
            extra += int(st.get("replay_steps", 0)) + int(st.get("rem_steps", 0))
            extra += int(st.get("consolidation_steps", 0)) + int(st.get("fast_updates", 0))
        return {"R": R, "metrics": metrics_of(R), "extra_steps": extra, "train_steps": step}

    @staticmethod
    def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
        T = len(runs[0]["R"])
        mean_R = [[statistics.fmean(r["R"][i][j] for r in runs) for j in range(T)] for i in range(T)]
        return {
            **{k: _mean_std([r["metrics"][k] for r in runs]) for k in ("accuracy", "bwt", "forgetting")},
            "R_mean": mean_R, "R": [r["R"] for r in runs],
            "extra_steps": statistics.fmean(r["extra_steps"] for r in runs),
            "train_steps": runs[0]["train_steps"],
            "seconds": statistics.fmean(r["seconds"] for r in runs),
            "runs": [{"extra_steps": r["extra_steps"]} for r in runs],
        }

    def _report(self, base: str, per: dict[str, dict[str, Any]], result: SuiteResult) -> None:
        plain = per["plain"]["forgetting"]["mean"]
        rows = []
        for config, fig in per.items():
            f = fig["forgetting"]["mean"]
            reduction = 1 - f / plain if plain > 0 else float("nan")
            fig["reduction_vs_plain"] = reduction
            rows.append([config, _pm(fig["accuracy"]), _pm(fig["bwt"]), _pm(fig["forgetting"]),
                         "" if config == "plain" else (f"{reduction:.0%}" if plain > 0 else "n/a"),
                         fig["train_steps"], round(fig["extra_steps"]), round(fig["seconds"], 1)])
        n = len(per["plain"]["R"])
        result.tables.append((
            f"Continual learning on {base} (mean ± std over {n} seed{'s' if n > 1 else ''})",
            ["configuration", "accuracy", "BWT", "forgetting", "forgetting reduction", "train steps",
             "extra steps", "s/run"], rows))
        for config, fig in per.items():
            T = len(fig["R_mean"])
            result.tables.append((
                f"R[i, j] of {config} on {base} (mean over seeds): row = after task i, column = task j",
                ["after task"] + [f"task {j + 1}" for j in range(T)],
                [[f"task {i + 1}"] + [round(v, 3) for v in row] for i, row in enumerate(fig["R_mean"])]))
        ours, replayed = per["sleep_wake+cls"], per["plain+replay"]
        result.notes.append(
            f"{base}: at equal compute ({round(replayed['extra_steps'])} extra steps), plain+replay forgets "
            f"{_pm(replayed['forgetting'])} and sleep_wake+cls {_pm(ours['forgetting'])}.")
        if plain > 0:
            result.checks.append(Check(f"{base}: forgetting reduction of sleep_wake+cls vs plain",
                                       per["sleep_wake+cls"]["reduction_vs_plain"], TARGET_REDUCTION))
        else:
            result.notes.append(f"{base}: plain fine-tuning forgot nothing (forgetting {plain:.3f}); "
                                "the reduction is undefined and no check is reported.")
        result.plots[f"continual-{_slug(base)}.png"] = self._plot(per)

    @staticmethod
    def _plot(per: dict[str, dict[str, Any]]):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(per), figsize=(3.2 * len(per), 3), squeeze=False)
        for ax, (config, figure) in zip(axes[0], per.items()):
            R = figure["R_mean"]
            ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
            for i, row in enumerate(R):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
            ax.set_title(f"{config}\nforgetting {figure['forgetting']['mean']:.3f}", fontsize=8)
            ax.set_xlabel("task j")
            ax.set_ylabel("after task i")
            ax.set_xticks(range(len(R)), [str(j + 1) for j in range(len(R))])
            ax.set_yticks(range(len(R)), [str(i + 1) for i in range(len(R))])
        fig.tight_layout()
        return fig


class Reservoir:
    """A uniform sample of the training rows seen (reservoir sampling), as ``sleep_wake``
    keeps: ``buffer`` rows at most, ``record_rows`` offered from each batch; batches of
    ``replay_batch`` rows drawn uniformly from it."""

    def __init__(self, settings: Any, rng: random.Random) -> None:
        self.capacity, self.offered, self.rows = settings.buffer, settings.record_rows, settings.replay_batch
        self.rng = rng
        self.kept: list[torch.Tensor] = []
        self.seen = 0

    def add(self, batch: torch.Tensor) -> None:
        for row in batch[: self.offered]:
            self.seen += 1
            if len(self.kept) < self.capacity:
                self.kept.append(row.clone())
            elif (at := self.rng.randrange(self.seen)) < self.capacity:
                self.kept[at] = row.clone()

    def sample(self) -> torch.Tensor:
        return torch.stack(self.rng.sample(self.kept, min(self.rows, len(self.kept))))


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in Path(text).stem).strip("-") or "base"


@hookimpl
def cortex_register_components(register):
    register(Continual)
