"""The memory system inside a model: writes, both read modes, streams, consolidation."""

from __future__ import annotations

import pytest
import torch

from cortex.core.memory import session_stream, tier_weights
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CORE = {"dim": 64, "context": 64}


def manifest(read=("knn_lm",), layers=(), after=3, **system) -> str:
    """Three tiers read by ``read`` (``system``: more memory_system settings)."""
    return tiny_manifest(
        "mem", **CORE, memory_layers=list(layers),
        memory=[{"type": "stm", "settings": {"capacity": 256, "consolidate_after": after, "threshold": 0.999}},
                {"type": "ltm", "settings": {"capacity": 4096, "idle_steps": 2}},
                {"type": "archive", "settings": {"capacity": 8192, "pq_m": 8, "train_after": 64}}],
        memory_system={"read": list(read), "key_window": 16, **system},
    )


def test_tier_weights_follow_the_temperature():
    best = torch.tensor([[0.9, 0.5, float("-inf")]])
    sharp, soft = tier_weights(best, 0.05), tier_weights(best, 10.0)
    assert sharp[0, 2] == 0 and soft[0, 2] == 0  # an empty tier never gets weight
    assert 0.99 < sharp[0, 0] < 1.0  # sharp: nearly, never exactly, winner-take-all
    assert abs(soft[0, 0] - soft[0, 1]) < 0.05  # soft: nearly even
    assert torch.allclose(sharp.sum(), torch.tensor(1.0)) and torch.allclose(soft.sum(), torch.tensor(1.0))
    assert tier_weights(torch.full((1, 2), float("-inf")), 1.0).sum() == 0


def test_knn_lm_recalls_a_fact_told_once_whatever_precedes_the_cue(build_model):
    torch.manual_seed(0)
    model = build_model(manifest()).eval()
    plain = build_model(tiny_manifest("mem", **CORE, memory_layers=[])).eval()  # the same core, no memory
    plain.core.load_state_dict(model.core.state_dict())
    fact = "Mina's locker number is 3817."
    assert model.remember(fact) > 0
    cue = "We talked about the weather for a while. Then: Mina's locker number is"
    assert model.generate_text(cue, max_new_tokens=5).startswith(" 3817")
    assert not plain.generate_text(cue, max_new_tokens=5).startswith(" 3817")
    # another session's memory is not consulted
    assert not model.generate_text(cue, max_new_tokens=5, session="someone-else").startswith(" 3817")


def test_knn_lm_reads_only_the_told_texts_it_is_given(build_model):
    """Two told texts in one wording: kNN-LM reads both, or with ``told`` only the one it
    accepts (by the text each entry was written from), or nothing when it accepts none."""
    torch.manual_seed(0)
    model = build_model(manifest()).eval()
    old, new = "Old note. Mina's locker number is 5290.", "New note! Mina's locker number is 3817."
    model.remember(old, session="s")
    model.remember(new, session="s")
    system, stream = model.memory_system, session_stream("s")
    key = system.keys(torch.tensor([model.tokenizer.encode("Mina's locker number is ")]))[0, -1:]
    vocab = model.config.vocab_size
    five, three = model.tokenizer.encode("5")[0], model.tokenizer.encode("3")[0]
    both, lam = system.knn_distribution(key, stream, vocab)
    assert both[0, five] > 1e-3 and both[0, three] > 1e-3 and lam[0] > 0
    only_new, lam = system.knn_distribution(key, stream, vocab, told=lambda text: text == new)
    assert only_new[0, five] == 0 and only_new[0, three] > 0.99 and lam[0] > 0
    _, lam = system.knn_distribution(key, stream, vocab, told=lambda text: False)
    assert lam[0] == 0  # nothing it may read: the model's own distribution


def test_knn_attention_reads_only_the_rows_own_stream_and_no_gradient_reaches_memory(build_model):
    torch.manual_seed(0)
    model = build_model(manifest(read=["knn_attention"], layers=[0]))
    model.train()
    x = torch.randint(0, 200, (2, 17))
    model(x[:, :-1], x[:, 1:])  # writes both rows' segments to their own streams
    stm = model.memory[0]
    assert len(stm) > 0
    stored = stm.state_dict()
    reader = model.core.blocks[0].memory
    torch.nn.init.normal_(reader.out.weight, std=1.0)  # make the memory path visible in the output
    with torch.no_grad():
        reader.gate.fill_(5.0)
    y = torch.randint(0, 200, (2, 16))
    logits, _ = model(y, streams=torch.tensor([0, 1]))
    changed_other, _ = model(y, streams=torch.tensor([0, 7]))  # row 1 now reads an empty stream
    assert torch.allclose(logits[0], changed_other[0], atol=1e-5)
    assert not torch.allclose(logits[1], changed_other[1], atol=1e-3)
    loss = logits.float().pow(2).mean()
    loss.backward()
    assert reader.query.weight.grad is not None and reader.query.weight.grad.abs().sum() > 0
    after = stm.state_dict()
    for key in ("keys", "values"):  # reads count uses; contents never change
        assert not after[key].requires_grad
        assert torch.equal(stored[key], after[key]), key


def test_training_without_writes_trains_the_same_weights_and_leaves_memory_empty(build_model):
    """kNN-LM reads nothing in training: with ``write_in_training: false`` the steps give the
    same weights as with writes, every tier stays empty, and what is told afterwards is recalled."""
    from cortex.runtime.step import make_optimizer, train_step

    models = []
    for write in (True, False):
        torch.manual_seed(0)
        model = build_model(manifest(write_in_training=write)).train()
        opt = make_optimizer(model, lr=1e-3)
        data = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(1))
        for step in range(3):
            metrics = train_step(model, opt, [data], step=step, hook=model.pm.hook)
        models.append((model, metrics))
    (written, with_writes), (unwritten, without) = models
    assert with_writes["memory/writes"] > 0 and without["memory/writes"] == 0
    assert len(written.memory[0]) > 0 and all(len(tier) == 0 for tier in unwritten.memory)
    for a, b in zip(written.core.parameters(), unwritten.core.parameters()):
        assert torch.equal(a, b)
    unwritten.eval().remember("Mina's locker number is 3817.")
    assert len(unwritten.memory[0]) > 0  # real-time use still writes


def test_training_steps_fill_every_tier_with_consolidation(build_model):
    from cortex.runtime.step import make_optimizer, train_step

    torch.manual_seed(0)
    model = build_model(manifest(read=["knn_attention", "knn_lm"], layers=[1], after=1))
    model.train()
    opt = make_optimizer(model, lr=1e-3)
    data = torch.randint(0, 50, (4, 33))
    metrics = {}
    for step in range(8):
        metrics = train_step(model, opt, [data], step=step, hook=model.pm.hook)
    stm, ltm, archive = model.memory
    assert len(stm) > 0 and len(ltm) > 0 and len(archive) > 0
    assert model.memory_system.stats["consolidated"] > 0
    assert metrics["memory/writes"] > 0
    assert stm.stats()["consolidated_out"] > 0 and ltm.stats()["consolidated_in"] > 0
    assert 0 < stm.stats()["hit_rate"] <= 1  # dense reads are counted like searched ones


def test_consolidation_waits_for_sleep_when_configured(build_model):
    from cortex.runtime.step import make_optimizer, train_step

    model = build_model(manifest(read=["knn_attention"], layers=[1], after=1, consolidate="sleep"))
    model.train()
    opt = make_optimizer(model, lr=1e-3)
    data = torch.randint(0, 50, (2, 33))
    for step in range(3):
        train_step(model, opt, [data], step=step, hook=model.pm.hook)
    stm, ltm, _ = model.memory
    assert len(ltm) == 0 and len(stm) > 0
    model.pm.hook.cortex_sleep(model=model, phase="rem", step=3)
    assert len(ltm) == 0
    model.pm.hook.cortex_sleep(model=model, phase="nrem", step=3)
    assert len(ltm) > 0


def test_memory_survives_a_restart(build_model, tmp_path):
    from cortex.runtime.rundir import load_run, save_run

    torch.manual_seed(0)
    model = build_model(manifest()).eval()
    model.remember("Jisoo's bike code is 5521.")
    path = save_run(model, tmp_path)
    again = load_run(path).eval()
    cue = "Unrelated words first. Jisoo's bike code is"
    assert again.generate_text(cue, max_new_tokens=5) == model.generate_text(cue, max_new_tokens=5)
    assert again.generate_text(cue, max_new_tokens=5).startswith(" 5521")


def test_sessions_map_to_stable_streams_outside_training_rows():
    assert session_stream("self") == session_stream("self") != session_stream("other")
    assert session_stream("self") >= 1 << 32


def test_manifest_cross_checks(tmp_path):
    from cortex.kernel.manifest import ManifestError, load_manifest_text

    with pytest.raises(ManifestError, match="knn_attention reads at the memory layers"):
        load_manifest_text(manifest(read=["knn_attention"]))
    with pytest.raises(ManifestError, match="needs at least one tier"):
        load_manifest_text(tiny_manifest("x", memory_system={"k": 4}))


def test_generation_keys_equal_the_stored_keys(build_model):
    """The key of the last position, computed from only key_span() tokens, is the key the
    same position got when its whole segment was stored."""
    torch.manual_seed(0)
    model = build_model(manifest(read=["knn_lm"], key_window=8)).eval()
    ms = model.memory_system
    ms.key_layer = 1
    ids = torch.randint(0, 200, (1, 64))
    full = ms.keys(ids)[0, -1]
    tail = ms.keys(ids[:, -ms.key_span():])[0, -1]
    assert torch.allclose(full, tail, atol=1e-5)
    short = ms.keys(ids[:, -(ms.key_span() - 8):])[0, -1]
    assert not torch.allclose(full, short, atol=1e-5)  # a shorter tail would not do


def test_rotated_keys_compare_offset_by_offset(build_model):
    """With one-token windows a key is a weighted sum over its offsets of one state per token.
    Swapping the tokens at two offsets barely moves a plain sum (a bag of states); the
    per-offset rotations make the swapped key a different key, as a side-by-side vector would."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = build_model(manifest(key_window=1)).eval()
    ms = model.memory_system
    a, b = model.tokenizer.encode("q")[0], model.tokenizer.encode("z")[0]
    x = model.tokenizer.encode("x")[0]
    ids = torch.tensor([[x, x, a, b, x], [x, x, b, a, x]])  # offsets 1 and 2 of the last position swapped
    with torch.no_grad():
        rotated = ms.keys(ids)[:, -1]
        h = F.normalize(model.core.hidden_states(ids, layer=ms.key_layer, window=1).float(), dim=-1)
        offsets = [o for o in sorted(set(ms.settings.key_offsets)) if o < ids.shape[1]]
        plain = F.normalize(sum(ms.settings.key_decay**i * h[:, -1 - o] for i, o in enumerate(offsets)), dim=-1)
    cos_rotated, cos_plain = float(rotated[0] @ rotated[1]), float(plain[0] @ plain[1])
    assert cos_plain > 0.95 and cos_rotated < cos_plain - 0.1, (cos_rotated, cos_plain)
    # the rotations are fixed: a second model of the same shape makes the same keys
    again = build_model(manifest(key_window=1), name="again.yaml").eval()
    again.core.load_state_dict(model.core.state_dict())
    assert torch.allclose(again.memory_system.keys(ids), ms.keys(ids))


def test_knn_lm_pools_the_neighbours_of_every_tier(build_model):
    """The exact match wins wherever it is held: a near miss in STM does not outvote the
    exact entry in LTM (tiers weighted first by a softmax of their best scores would)."""
    torch.manual_seed(0)
    model = build_model(manifest()).eval()
    ms = model.memory_system
    stm, ltm = ms.tiers[0], ms.tiers[1]
    key = torch.nn.functional.normalize(torch.randn(1, 64), dim=-1)
    near = torch.nn.functional.normalize(key + 0.03 * torch.randn(1, 64), dim=-1)
    from cortex.kernel.interfaces import Entries

    stream = 0
    ltm.write(Entries(keys=key, values=key, tokens=torch.tensor([7]), streams=torch.tensor([stream])), step=0)
    stm.write(Entries(keys=near, values=near, tokens=torch.tensor([9]), streams=torch.tensor([stream])), step=0)
    assert 0.95 < float(near @ key.T) < 0.995  # close enough to pass lm_min_score
    dist, lam = ms.knn_distribution(key, stream, vocab=32, touch=False)
    assert dist[0, 7] > 0.99 and dist[0, 9] < 0.01 and lam[0] > 0


def test_knn_lm_margin_lowers_memory_weight_where_a_rival_token_is_nearly_as_close(build_model):
    """Many statements in one wording leave neighbours with other next tokens almost as close
    as the best: with ``lm_margin`` memory then weighs little (the model and its features
    decide); a clear best neighbour keeps its full weight. Off (0), both weigh the same."""
    torch.manual_seed(0)
    from cortex.kernel.interfaces import Entries

    def weights(margin):
        ms = build_model(manifest(lm_margin=margin)).eval().memory_system
        key = torch.nn.functional.normalize(torch.ones(1, 64), dim=-1)
        close = torch.nn.functional.normalize(key + 0.01 * torch.eye(64)[:1], dim=-1)  # cosine ~0.99998
        far = torch.nn.functional.normalize(key + 0.5 * torch.eye(64)[:1], dim=-1)  # cosine ~0.94
        lam = []
        for rival in (close, far):
            stream = len(lam)  # one stream per case
            ms.tiers[1].write(Entries(keys=torch.cat([key, rival]), values=torch.cat([key, rival]),
                                      tokens=torch.tensor([7, 9]), streams=torch.tensor([stream, stream])), step=0)
            lam.append(float(ms.knn_distribution(key, stream, vocab=32, touch=False)[1][0]))
        return lam

    (ambiguous, clear), (off_ambiguous, off_clear) = weights(0.01), weights(0.0)
    assert ambiguous < 0.05 * clear and clear > 0.95 * off_clear and off_ambiguous == off_clear > 0


def test_knn_lm_recalled_only_reads_memory_only_for_prompts_about_told_text(build_model):
    """With ``lm_recalled_only`` kNN-LM reads where a feature (here the reader, by a rare shared
    word) put told text before the prompt: the told name's cue completes from memory, the
    same wording about a name never told does not. Without it, both read the told value."""
    answers = {}
    for only in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_manifest(
            "mem", **CORE, memory=[{"type": "stm", "settings": {"capacity": 256}}],
            memory_system={"read": ["knn_lm"], "key_window": 16, "lm_recalled_only": only},
            features=[{"type": "reader", "settings": {"background": 300}}])).eval()
        model.remember("Aris's locker number is 3817.")
        answers[only] = [model.generate_text(f"{name}'s locker number is", max_new_tokens=5).startswith(" 3817")
                         for name in ("Aris", "Cato")]
    assert answers == {False: [True, True], True: [True, False]}


def test_read_min_score_leaves_unrelated_text_alone_outside_training(build_model):
    """With a floor, an inference read of entries no closer than it adds nothing (the output
    equals an empty memory's); close entries are still read, and training reads them all."""
    torch.manual_seed(0)

    def reader_model(floor):
        text = manifest(read=["knn_attention"], layers=[0], **({"read_min_score": floor} if floor else {}))
        model = build_model(text)
        model.core.load_state_dict(base.core.state_dict())
        reader = model.core.blocks[0].memory
        reader.load_state_dict(base.core.blocks[0].memory.state_dict())
        model.remember("Mina's locker number is 3817. She keeps her violin in it.")
        return model

    base = build_model(manifest(read=["knn_attention"], layers=[0]))
    reader = base.core.blocks[0].memory
    torch.nn.init.normal_(reader.out.weight, std=1.0)  # make the memory path visible in the output
    with torch.no_grad():
        reader.gate.fill_(5.0)
    tok = base.tokenizer
    unrelated = torch.tensor([tok.encode("The weather in Busan was cold and windy all week.")])
    told = torch.tensor([tok.encode("Mina's locker number is 3817. She keeps her violin in it.")])
    own, empty = torch.tensor([session_stream("self")]), torch.tensor([session_stream("nobody")])

    def logits(model, ids, streams):
        with torch.no_grad():
            return model(ids, streams=streams)[0]

    plain, floored = reader_model(None).eval(), reader_model(0.9).eval()
    for model in (plain, floored):
        assert not torch.allclose(logits(model, told, own), logits(model, told, empty), atol=1e-3)  # reads its match
    assert not torch.allclose(logits(plain, unrelated, own), logits(plain, unrelated, empty), atol=1e-3)
    torch.testing.assert_close(logits(floored, unrelated, own), logits(floored, unrelated, empty))
    floored.train()  # training reads every retrieved entry
    assert not torch.allclose(logits(floored, unrelated, own), logits(floored, unrelated, empty), atol=1e-3)


def test_a_cue_asked_alone_compares_only_the_offsets_it_has(build_model):
    """A key near the start of a text lacks the offsets that reach before it, so it matches
    the same text stored after other words only at about its coverage; kNN-LM lowers its
    floor by that factor, and still ignores what does not match the offsets it has."""
    from cortex.kernel.interfaces import Entries

    torch.manual_seed(0)
    model = build_model(manifest()).eval()
    ms = model.memory_system
    coverage = ms.key_coverage(torch.arange(40))
    weights = torch.tensor([0.9 ** (2 * i) for i in range(9)])  # key_decay 0.9, nine offsets
    assert coverage[0] == pytest.approx(float((weights[:1].sum() / weights.sum()).sqrt()))
    assert coverage[4] == pytest.approx(float((weights[:4].sum() / weights.sum()).sqrt()))  # offsets 0, 1, 2, 4
    assert torch.all(coverage[:-1] <= coverage[1:]) and torch.all(coverage[24:] == 1.0)
    # offset terms as the key function builds them: unit vectors in near-orthogonal directions
    terms = torch.linalg.qr(torch.randn(64, 64))[0][:9] * weights.sqrt()[:, None]
    stored = torch.nn.functional.normalize(terms.sum(0, keepdim=True), dim=-1)  # said after other text
    cue = torch.nn.functional.normalize(terms[:4].sum(0, keepdim=True) + 0.1 * torch.randn(1, 64), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(1, 64), dim=-1)
    ms.tiers[0].write(Entries(keys=torch.cat([stored, other]), values=torch.cat([stored, other]),
                              tokens=torch.tensor([7, 9]), streams=torch.tensor([0, 0])), step=0)
    assert coverage[4] * ms.settings.lm_min_score < float(cue @ stored.T) < ms.settings.lm_min_score
    _, lam = ms.knn_distribution(cue, 0, vocab=32, touch=False)
    assert lam[0] == 0  # a full-key floor misses it
    dist, lam = ms.knn_distribution(cue, 0, vocab=32, touch=False, coverage=coverage[4:5])
    assert lam[0] > 0 and dist[0, 7] > 0.99
    unrelated = torch.nn.functional.normalize(torch.randn(1, 64), dim=-1)
    _, lam = ms.knn_distribution(unrelated, 0, vocab=32, touch=False, coverage=coverage[4:5])
    assert lam[0] == 0


def test_confidence_reads_knn_attention_and_strengthens_nothing(build_model):
    torch.manual_seed(0)
    model = build_model(manifest(read=["knn_attention"], layers=[0])).eval()
    reader = model.core.blocks[0].memory
    torch.nn.init.normal_(reader.out.weight, std=1.0)  # untrained, the read is faint: make it visible
    with torch.no_grad():
        reader.gate.fill_(5.0)
    cue, answer = "Mina's locker number is", " 3817."
    empty = model.confidence(cue, answer, session="empty")
    model.remember("Mina's locker number is 3817.", session="told")
    stm = model.memory[0]
    uses = stm.state_dict()["uses"].clone()
    told = model.confidence(cue, answer, session="told")
    assert abs(told / empty - 1) > 5e-3  # kNN-attention is read: a told session is not an empty one
    assert torch.equal(stm.state_dict()["uses"], uses)  # looking strengthened nothing
    with torch.no_grad():
        reader.gate.fill_(-30.0)  # the read shut: the told session scores as the empty one
    assert model.confidence(cue, answer, session="told") == pytest.approx(
        model.confidence(cue, answer, session="empty"), abs=1e-6)
