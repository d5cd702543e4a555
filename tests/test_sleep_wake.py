"""sleep_wake: the cycle and its hooks, hand-over only in NREM, replay that lowers the
loss on what it replays, REM recombination, exact resume, and examples/full.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from cortex import hookimpl
from cortex.runtime.step import make_optimizer, train_step
from cortex_plugins.cognition.sleep_wake import SleepWake
from tests.conftest import tiny_manifest

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CYCLE = {"wake": 3, "nrem": 2, "rem": 1, "lr": 1.0e-3}


def manifest(*before: dict, **sleep) -> str:
    """STM and LTM consolidated in sleep; ``sleep``: the sleep_wake settings (``CYCLE`` when
    none), ``before``: features listed before sleep_wake."""
    return tiny_manifest(
        "sw", context=64, memory_system={"consolidate": "sleep", "write": "all"},
        memory=[{"type": "stm", "settings": {"capacity": 16, "consolidate_after": 2}},
                {"type": "ltm", "settings": {"capacity": 1024}}],
        features=[*before, {"type": "sleep_wake", "settings": sleep or CYCLE}],
    )


MEMORY = manifest()

TEXTS = ["Mina's locker number is 3817.", "The blue kettle is on the second shelf.",
         "Jisoo rides bus 42 to school."]


def sleep_feature(model) -> SleepWake:
    return next(f for f in model.features if isinstance(f, SleepWake))


def text_loss(model, texts: list[str]) -> float:
    with torch.no_grad():
        losses = []
        for text in texts:
            ids = torch.tensor([model.tokenizer.encode(text)])
            losses.append(float(model.core(ids[:, :-1], ids[:, 1:])[1]))
    return sum(losses) / len(losses)


def test_cycle_lengths_from_settings():
    assert SleepWake.Settings().lengths() == (1000, 50, 20)
    assert SleepWake.Settings(cycle=1000).lengths() == (900, 70, 30)
    assert SleepWake.Settings(cycle=10, ratios=[0.8, 0.2, 0.0]).lengths() == (8, 2, 0)
    with pytest.raises(ValidationError, match="either"):
        SleepWake.Settings(cycle=100, wake=10)


def test_phases_fire_the_hook_and_are_logged(build_model):
    torch.manual_seed(0)
    model = build_model(MEMORY)
    seen = []

    class Listener:
        @hookimpl
        def cortex_sleep(self, model, phase, step):
            seen.append((phase, step))

    model.pm.register(Listener())
    opt = make_optimizer(model, 1e-3)
    batch = torch.randint(0, 256, (2, 33))
    phases = [train_step(model, opt, [batch], step=s, hook=model.pm.hook)["sleep/phase"] for s in range(12)]
    assert phases == [0, 0, 0, 1, 1, 2] * 2
    assert seen == [("nrem", 3), ("rem", 5), ("wake", 6), ("nrem", 9), ("rem", 11)]
    stats = sleep_feature(model).stats()
    assert stats["replay_steps"] == 4 and stats["rem_steps"] == 2 and stats["cycles"] == 1


def test_stm_hands_over_to_ltm_only_in_nrem(build_model):
    torch.manual_seed(0)
    model = build_model(MEMORY)
    stm, ltm = model.memory
    opt = make_optimizer(model, 1e-4)
    batch = torch.randint(0, 256, (2, 33))  # the same segment again and again: its entries strengthen
    grew_in = []
    for s in range(12):
        before = len(ltm)
        metrics = train_step(model, opt, [batch], step=s, hook=model.pm.hook)
        if len(ltm) > before:
            grew_in.append(metrics["sleep/phase"])
        if metrics["sleep/phase"] == 0:
            assert len(ltm) == before  # awake: STM keeps everything, however strong
    assert grew_in and set(grew_in) == {1.0}
    assert stm.counters.consolidated_out == len(ltm) > 0


def test_nrem_replay_lowers_the_loss_on_the_replayed_memories(build_model):
    torch.manual_seed(0)
    model = build_model(manifest(wake=3, nrem=12, rem=0, lr=3.0e-3, sources=["memory"], replay_batch=4))
    for text in TEXTS:
        model.remember(text)
    other = ["A completely different sentence about rain."]
    before, before_other = text_loss(model, TEXTS), text_loss(model, other)
    losses = sleep_feature(model).sleep(model)
    after, after_other = text_loss(model, TEXTS), text_loss(model, other)
    replayed = {model.tokenizer.decode(s.tolist()) for s in sleep_feature(model).last_replayed}
    assert replayed <= set(TEXTS)  # it replayed the stored memories, reconstructed from their entries
    assert after < 0.8 * before, (before, after)
    assert before - after > before_other - after_other  # what was replayed gained most
    assert losses["sleep/nrem_loss"] > after


def test_episodes_of_an_episodic_feature_are_replayed(build_model):
    model = build_model(MEMORY)
    sw = sleep_feature(model)

    class Episodes:
        def replay(self, n, strategy="recent", seed=None):
            return [type("E", (), {"tokens": torch.arange(10, 20)})()]

    model.features.append(Episodes())
    pool = sw.pool(model)
    assert any(torch.equal(s, torch.arange(10, 20)) for s in pool)


def test_buffer_is_a_uniform_reservoir(build_model):
    model = build_model(manifest(**CYCLE, buffer=50))
    sw = sleep_feature(model)
    for i in range(1000):
        sw.record(torch.tensor([i, i]))
    firsts = sorted(int(s[0]) for s in sw.buffered())
    assert len(firsts) == 50 and sw.seen == 1000
    assert sum(f < 500 for f in firsts) >= 15 and sum(f >= 500 for f in firsts) >= 15  # old and new alike


def test_rem_recombines_fragments_of_different_memories(build_model):
    model = build_model(MEMORY)
    sw = sleep_feature(model)
    tok = model.tokenizer
    pool = [torch.tensor(tok.encode("ab=1;cd=2;")), torch.tensor(tok.encode("ef=3;gh=4;"))]
    frags = {tok.decode(f.tolist()) for f in sw.fragments(pool)}
    assert frags == {"ab=1;", "cd=2;", "ef=3;", "gh=4;"}
    sw._pool = pool
    mixed = sw.recombine(8, torch.Generator().manual_seed(0))
    texts = [tok.decode(s.tolist()) for s in mixed]
    assert all(len(s) == sw.seq_len for s in mixed)
    assert any(("ab=1;" in t or "cd=2;" in t) and ("ef=3;" in t or "gh=4;" in t) for t in texts)


def test_rem_generate_dreams_from_the_model_and_learns_from_its_dreams(build_model):
    """``rem_mode: generate``: each replayed sequence opens with a stored memory's first
    ``rem_prompt`` tokens and goes on with what the model itself predicts (near-greedy
    sampling: every later token is the pre-sleep model's argmax), not with the memory; the
    REM step then trains on those dreams."""
    torch.manual_seed(0)
    model = build_model(manifest(wake=1, nrem=0, rem=1, lr=1.0e-3, sources=["buffer"], replay_batch=4,
                                 replay_tokens=32, rem_mode="generate", rem_prompt=6, rem_temperature=1.0e-4))
    sw = sleep_feature(model)
    tok = model.tokenizer
    stored = [torch.tensor(tok.encode(text)) for text in TEXTS]
    for seq in stored:
        sw.record(seq)
    before = {name: t.clone() for name, t in model.core.state_dict().items()}
    losses = sw.sleep(model)
    assert sw.stats()["rem_steps"] == 1 and sw.stats()["replay_steps"] == 0 and "sleep/rem_loss" in losses
    assert any(not torch.equal(p, before[name]) for name, p in model.core.named_parameters())  # it learnt
    dreams = sw.last_replayed
    assert len(dreams) == 4 and all(d.numel() == sw.seq_len for d in dreams)
    for dream in dreams:
        assert any(torch.equal(dream[:6], seq[:6]) for seq in stored)  # opened by a memory
        assert not any(torch.equal(dream[:seq.numel()], seq) for seq in stored)  # not the memory itself
        assert tok.decode(dream.tolist()) not in TEXTS
    model.core.load_state_dict(before)  # the model that dreamt them
    with torch.no_grad():
        logits, _ = model.core(torch.stack(dreams)[:, :-1])
    predicted = logits.argmax(-1)[:, 5:]  # the tokens after the 6-token opening
    assert float((predicted == torch.stack(dreams)[:, 6:]).float().mean()) > 0.95


def test_interactions_advance_the_clock(build_model):
    model = build_model(MEMORY).eval()
    sw = sleep_feature(model)
    for i in range(4):
        model.interact(TEXTS[i % 3], max_new_tokens=2)
    assert sw.clock == 4 and sw.phase == "nrem"
    assert sw.stats()["replay_steps"] == 1


def test_resume_continues_exactly(build_model):
    with_cls = manifest({"type": "cls", "settings": {"width": 4, "slow_share": 0.5}})

    def run(model, opt, steps):
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 256, (2, 33), generator=g) for _ in range(9)]
        for s in steps:
            train_step(model, opt, [batches[s]], step=s, hook=model.pm.hook)

    torch.manual_seed(0)
    a = build_model(with_cls)
    opt_a = make_optimizer(a, 1e-3)
    run(a, opt_a, range(9))
    torch.manual_seed(0)
    b = build_model(with_cls, name="b.yaml")
    opt_b = make_optimizer(b, 1e-3)
    run(b, opt_b, range(4))
    saved = (b.core.state_dict(), opt_b.state_dict(), b.plugin_state())
    torch.manual_seed(0)
    c = build_model(with_cls, name="c.yaml")
    c.core.load_state_dict(saved[0])
    opt_c = make_optimizer(c, 1e-3)
    opt_c.load_state_dict(saved[1])
    c.load_plugin_state(saved[2])
    run(c, opt_c, range(4, 9))
    for (name, p), q in zip(a.core.named_parameters(), c.core.parameters()):
        assert torch.equal(p, q), name
    assert sleep_feature(a).stats() == sleep_feature(c).stats()


def _full_example(tmp_path, name: str, **train):
    """examples/full.yaml (every built-in plugin), its sleep cycle shortened to a few steps,
    assembled into a fresh run directory, with small training settings."""
    from cortex.assembly import assemble
    from cortex.kernel.manifest import load_manifest
    from cortex.runtime.rundir import save_run

    text = (ROOT / "examples/full.yaml").read_text(encoding="utf-8")
    short = "{wake: 2, nrem: 1, rem: 1, lr: 1.0e-4}"  # a whole cycle within the few steps
    text = text.replace("{wake: 100, nrem: 10, rem: 4, lr: 1.0e-4}", short)
    assert short in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    built = load_manifest(path)
    model = assemble(built)
    settings = built.manifest.train.model_copy(update={
        "data": built.manifest.train.data.model_copy(update={"settings": {"documents": 300}}),
        "batch": 4, "warmup": 2, **train})
    return built, model, save_run(model, tmp_path / "runs", name=name), settings


def test_full_example_validates_builds_trains_and_resumes_exactly(tmp_path):
    """examples/full.yaml with every plugin: N steps then a resume of N more gives the
    weights and plugin state of 2N steps straight (bcm, hebbian, cls, sleep, memory...)."""
    from cortex.runtime.rundir import load_run
    from cortex.runtime.train import train
    from tests.test_checkpoint import _flat

    n = 3
    built, model, run_a, settings = _full_example(tmp_path, "a", eval_every=n, checkpoint_every=n)
    names = {c.spec.type for c in built.components}
    assert {"stm", "ltm", "archive", "hebbian", "bcm", "homeostasis", "cortical_columns", "episodic",
            "working", "cognition_graph", "cls", "sleep_wake"} <= names
    summary = train(model, run_a, settings, steps=2 * n)
    sw = sleep_feature(model)
    assert summary["steps"] == 2 * n and summary["loss"] is not None
    assert sw.stats()["transitions"] >= 3 and sw.stats()["replay_steps"] >= 1

    _, first, run_b, _ = _full_example(tmp_path, "b")
    train(first, run_b, settings, steps=2 * n, stop_at=n)
    torch.manual_seed(1234)  # a fresh process would not share the first half's RNG state
    resumed = load_run(run_b)
    train(resumed, run_b, settings, resume="auto")
    for (name, a), b in zip(model.core.state_dict().items(), resumed.core.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = dict(_flat(model.plugin_state())), dict(_flat(resumed.plugin_state()))
    assert sa.keys() == sb.keys() and any("bcm" in k for k in sa)
    for key, value in sa.items():
        other = sb[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
