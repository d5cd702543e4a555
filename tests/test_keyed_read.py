"""kNN-attention that queries with the memory keys (``query: key``) and reads what followed
(``value: next`` / ``both``): a repeat of told text finds its own entries at cosine 1 in an
untrained model, where the learned query does not; the stored value names the next token;
generation gets the same keys one token at a time; the recall bench's long-document QA."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import cortex
from cortex.core.memory import KeyStream, MemoryAttention, session_stream
from cortex_plugins.bench.recall import qa_trial
from cortex_plugins.data.demo import long_demo_worlds
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLD = "Mina's locker number is 3817. She keeps her violin in it."
OWN = torch.tensor([session_stream("self")])


def build(tmp_path: Path, name: str, layers: int = 2, **system) -> cortex.CortexModel:
    settings = {"read": ["knn_attention"], "key_window": 16, "write": "all", **system}
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_manifest(name, seed=0, dim=64, layers=layers, context=64, memory_layers=[1],
                                  memory=[{"type": "stm", "settings": {"capacity": 256}}],
                                  memory_system=settings), encoding="utf-8")
    return cortex.assemble(cortex.load_manifest(path)).eval()


def best_scores(model, text: str) -> torch.Tensor:
    """The best cosine of each position's query to the stream's entries, read as a pass reads."""
    captured = {}
    original = MemoryAttention._dense

    def dense(self, tier, slots, q, null, read, step):
        keys, _, valid = slots
        captured["best"] = (q.float() @ keys.transpose(1, 2)).masked_fill(~valid[:, None, :], -2).amax(-1)[0]
        return original(self, tier, slots, q, null, read, step)

    ids = torch.tensor([model.tokenizer.encode(text)])
    MemoryAttention._dense = dense
    try:
        with torch.no_grad():
            model.core(ids, memory=model.memory_system.pass_read(ids, OWN))
    finally:
        MemoryAttention._dense = original
    return captured["best"]


def test_key_queries_find_a_repeat_exactly_where_the_learned_query_does_not(tmp_path):
    keyed, learned = build(tmp_path, "keyed", query="key"), build(tmp_path, "learned")
    for model in (keyed, learned):
        model.remember(TOLD)
    assert float(best_scores(keyed, TOLD)[1:-1].min()) > 0.999  # untrained: each position finds its own entry
    assert float(best_scores(learned, TOLD)[1:].mean()) < 0.9
    assert not keyed.core.memory_layer(1).query.weight.requires_grad  # the keys query: nothing to train there


def test_the_value_carries_the_token_that_followed(tmp_path):
    emb = None
    for value, names_next in (("next", True), ("both", True), ("state", False)):
        model = build(tmp_path, f"v{value}", query="key", value=value)
        model.remember(TOLD)
        keys, values, valid = model.memory_system.tiers[0].dense_entries(OWN)
        tokens = model.memory_system.tiers[0].dense_tokens(OWN)[0][valid[0]]
        emb = model.core.tok_emb.weight.detach().float()
        nearest = (F.normalize(values[0][valid[0]], dim=-1) @ F.normalize(emb, dim=-1).T).argmax(-1)
        share = float((nearest == tokens).float().mean())
        assert (share > 0.95) if names_next else (share < 0.5), (value, share)


def test_generation_reads_with_the_keys_of_each_new_token(tmp_path):
    model = build(tmp_path, "gen", query="key", value="next")
    model.remember(TOLD)
    ids = torch.tensor([model.tokenizer.encode("Mina's locker number is 38")])
    keys = KeyStream(model.memory_system)
    read = model.memory_system.generation_read(OWN, keys)
    whole = read(ids, ids.shape[1]).keys  # a cached pass over the window
    stepped = read(ids, 1).keys  # one new token: the key stream's
    torch.testing.assert_close(stepped[:, -1], whole[:, -1], atol=1e-4, rtol=0)
    assert keys.last(ids) is keys.key  # asked again for the same ids: not computed anew
    assert isinstance(model.generate_text("Mina's locker", max_new_tokens=4), str)
    learned = build(tmp_path, "plain")  # the learned query needs no keys: one read for every step
    assert learned.memory_system.generation_read(OWN, None).keys is None


def test_reading_at_the_frontier_leaves_a_prompts_own_text_unread(tmp_path):
    """``read_at: frontier``: generation reads memory only where the next token is unknown, so
    a prompt that repeats told text and goes on elsewhere continues as in a session told
    nothing, where reading at every position pulls the told text into the prompt's states;
    a prompt that ends on told text still reads it."""
    models = {}
    for read_at in ("every", "frontier"):
        model = build(tmp_path, read_at, layers=3, query="key", value="next", read_min_score=0.99, read_at=read_at)
        if models:
            model.load_state_dict(models["every"].state_dict())
        reader = model.core.memory_layer(1)
        torch.manual_seed(1)
        torch.nn.init.normal_(reader.out.weight, std=1.0)  # the read shows in the output
        with torch.no_grad():
            reader.gate.fill_(5.0)
        model.remember(TOLD)
        models[read_at] = model

    def next_logits(model, prompt, session):  # the prompt's pass, read as generation reads
        ms, ids = model.memory_system, torch.tensor([model.tokenizer.encode(prompt)])
        read = ms.generation_read(torch.tensor([session_stream(session)]), KeyStream(ms))
        with torch.no_grad():
            return model.core(ids, memory=read(ids, ids.shape[1]))[0][:, -1]

    def reads(model, prompt):
        return not torch.allclose(next_logits(model, prompt, "self"), next_logits(model, prompt, "untold"), atol=1e-4)

    goes_on = TOLD[:24] + " lost, said the porter at noon; ask"
    assert reads(models["every"], goes_on) and not reads(models["frontier"], goes_on)
    assert reads(models["frontier"], TOLD[:24])


def test_a_keyed_reader_without_keys_says_what_is_missing(tmp_path):
    model = build(tmp_path, "nokeys", query="key")
    model.remember(TOLD)
    ids = torch.tensor([model.tokenizer.encode(TOLD)])
    from cortex.core.memory import MemoryRead
    with pytest.raises(ValueError, match="query: key needs the memory keys"):
        model.core(ids, memory=MemoryRead(OWN))


def test_the_recall_qa_task_asks_a_worlds_facts_in_its_question_wording():
    rng = random.Random(0)
    for _ in range(6):
        statements, questions = qa_trial(rng)
        assert questions and "?" not in statements
        for question, answer in questions:
            assert question.endswith("?") and not answer.endswith(".")
            assert answer.lower().split()[-1] in statements.lower() or answer in statements


def test_long_documents_restate_a_statement_windows_after_it_was_told():
    worlds = list(long_demo_worlds(6, 2, 64, lambda text: len(text.encode()), seed=1, restate=1.0))
    plain = list(long_demo_worlds(6, 2, 64, lambda text: len(text.encode()), seed=1))
    for world, same in zip(worlds, plain):
        facts, *rest = world.text.split("\n")
        told = {s.strip() + "." for s in facts.split(".") if s.strip()}
        tail = "\n".join(rest)
        restated = [line for line in rest if line in told]
        assert restated and len(tail[: tail.index(restated[0])].encode()) >= 2 * 64
        assert not [line for line in same.text.split("\n")[1:] if line in told]  # off: none


def test_long_documents_tell_codes_no_pattern_predicts_and_recite_them():
    from cortex_plugins.bench.heldout_templates import WORDINGS
    from cortex_plugins.data.demo import CODE_WORDINGS

    held_out = [w.split("{v}")[0].replace("{n}", "") for pairs in WORDINGS.values() for w, _ in pairs]
    for wording in CODE_WORDINGS[0] + CODE_WORDINGS[1]:  # no benchmark's wording is trained on
        assert "pass key" not in wording and not any(h.strip() in wording for h in held_out if h.strip())
    worlds = list(long_demo_worlds(8, 2, 64, lambda text: len(text.encode()), seed=2, recite=1.0, codes=2))
    lengths = set()
    for world in worlds:
        opening, *rest = world.text.split("\n")
        codes = [s.strip() for s in re.findall(r"[^.]+\.", opening)[-2:]]  # told last in the opening
        assert all(any(w.split("{n}")[-1].split("{v}")[0].strip() in c for w in sum(CODE_WORDINGS, [])) for c in codes)
        lengths |= {len(re.search(r"\d+", c).group()) for c in codes}
        assert all(c in rest[-len(world.qa) - 1] for c in codes)  # recited after the filler
    assert len(lengths) >= 3 and min(lengths) >= 3 and max(lengths) <= 7
    plain = next(iter(long_demo_worlds(1, 2, 64, lambda text: len(text.encode()), seed=2, recite=1.0)))
    assert not any(w.split(" {v}")[0].split("{n}")[-1] in plain.text for w in CODE_WORDINGS[0])


def test_long_documents_tell_key_value_lists_and_recite_them_in_another_order():
    from cortex_plugins.data.demo import PAIR_HEADS

    count = lambda text: len(text.encode())  # noqa: E731
    worlds = list(long_demo_worlds(40, 2, 64, count, seed=4, recite=1.0, codes=1, pairs=0.5))
    plain = list(long_demo_worlds(40, 2, 64, count, seed=4, recite=1.0, codes=1))
    listed = reordered = 0
    for world, without in zip(worlds, plain):
        opening, *rest = world.text.split("\n")
        told = re.search(r"(\S+): ((?:\w+=\d+, )*\w+=\d+)\.$", opening)
        if told is None:
            assert world.text == without.text  # the other worlds are as without lists
            continue
        listed += 1
        assert told.group(1) in PAIR_HEADS and "Remember" not in world.text
        pairs = re.findall(r"(\w+)=(\d+)", told.group(2))
        assert 3 <= len(pairs) <= 6
        assert not any(k.isalpha() and len(k) == 2 for k, _ in pairs)  # never MQAR's two letters
        recital = rest[-len(world.qa) - 1]
        assert sorted(re.findall(r"(\w+)=(\d+)", recital)) == sorted(pairs)  # every pair again, after the filler
        reordered += re.findall(r"(\w+)=(\d+)", recital) != pairs
        assert opening.replace(told.group(0), "").strip() == without.text.split("\n")[0]  # the rest unchanged
    assert 10 <= listed <= 30 and reordered >= listed // 2
    assert len({re.findall(r"\w+=", w.text.split("\n")[0])[0] for w in worlds if "=" in w.text}) > 5


def test_the_demo_source_passes_recite_codes_and_pairs_to_its_long_documents():
    from cortex import ByteTokenizer
    from cortex.core.transformer import ModelConfig
    from cortex.kernel.interfaces import BuildContext
    from cortex_plugins.data.demo import DemoSource

    settings = DemoSource.Settings(documents=12, distance_windows=2, seed=5, recite=1.0, codes=1, pairs=1.0)
    config = ModelConfig(vocab_size=259, dim=8, layers=1, heads=2, context=48)
    docs = [d.text for d in DemoSource(settings, BuildContext(config=config, tokenizer=ByteTokenizer())).documents()]
    count = lambda text: len(ByteTokenizer().encode(text))  # noqa: E731
    assert docs == [w.text for w in long_demo_worlds(12, 2, 48, count, seed=5, recite=1.0, codes=1, pairs=1.0)]
    assert all(re.search(r"\w+=\d+", d.split("\n")[0]) for d in docs)  # every opening tells a list
