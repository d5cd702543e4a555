"""The reader: pointer over the context, word overlap, told-text recall, demo updates, and
how the model consults it (``remember``, ``context_for``, ``adjust_logits``)."""

from __future__ import annotations

import hashlib
import math
import random
import zlib

import pytest
import torch

from cortex import CortexError
from cortex.kernel.interfaces import CognitiveFeature
from cortex_plugins.cognition._pointer_head import (BINS, ByteGrammar, PointerHead, continues_character,
                                                    match_lengths, particle_keys, word_spans)
from cortex_plugins.cognition.reader import Reader
from cortex_plugins.data.demo import demo_documents, demo_worlds, make_world
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sentence_words(ids: list[int]) -> list[list[bytes]]:
    """Each position's words, from ``word_spans``, in the order they came."""
    spans = word_spans(ids)
    return [[w for w, first, end in spans if first <= t < end] for t in range(len(ids))]


def test_sentence_words_keep_the_question_with_its_answer():
    text = "Bora lives in Daejeon. Tom's job.\nWhere does Bora live? Dae"
    w = sentence_words(list(text.encode()))
    assert w[13] == [b"bora", b"lives", b"in"]
    assert w[-1] == [b"where", b"does", b"bora", b"live", b"dae"]
    assert b"s" not in w[text.index("job")]  # the s of a possessive is not a word
    assert w[text.index(".")] == [] and w[text.index("Tom") + 1] == [b"to"]  # a sentence ends; a word is typed
    ko = sentence_words(list("민아는 부산에 산다. 민아는 ".encode()))
    assert "민아".encode() in ko[-14] and ko[-14].count("민아".encode()) == 1  # the particle cut, next to 민아는
    assert ko[-1] == ["민아는".encode(), "민아".encode()]  # a new sentence forgets the last one's words


def test_word_bags_sum_each_positions_words_by_rarity():
    """``bags`` (hashed, one vector a position, from ``start`` on) equals the bag built word by
    word from each position's sentence words, for English and Korean demo text."""
    head = _head()
    head.idf = lambda w: 1.0 + len(w) % 3
    texts = [w.text[:120] for w in demo_worlds(6, seed=3)]
    ids = torch.tensor([list(t.encode()[:100]) for t in texts])
    for start in (0, 37, 99):
        bags = head.bags(ids, start)
        expected = torch.zeros(ids.shape[0], ids.shape[1] - start, BINS)
        for b, row in enumerate(ids.tolist()):
            for t, found in enumerate(sentence_words(row)[start:]):
                for w in found:
                    expected[b, t, zlib.crc32(w) % BINS] += head.idf(w)
        torch.testing.assert_close(bags, expected)
    compact = head.bags(ids, compact=True)  # only the bins in use: the same overlaps, narrower
    full = head.bags(ids)
    assert compact.shape[-1] < BINS // 4
    torch.testing.assert_close(compact @ compact.transpose(1, 2), full @ full.transpose(1, 2))
    assert compact.sum() == full.sum()


def test_local_summary_weighs_each_positions_window_by_salience_and_offset():
    """Position t's summary: softmax over j in (t - window, t] of ``a[j] + offset_bias[t - j]``,
    applied to ``v[j]``; for every position or only the last few."""
    head = _head()  # window 4
    with torch.no_grad():
        head.offset_bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    v, a = torch.randn(2, 9, 8), torch.randn(2, 9)
    expected = torch.zeros(2, 9, 8)
    for t in range(9):
        js = list(range(max(0, t - 3), t + 1))
        w = torch.softmax(torch.stack([a[:, j] + head.offset_bias[t - j] for j in js], -1), -1)
        expected[:, t] = sum(w[:, i, None] * v[:, j] for i, j in enumerate(js))
    torch.testing.assert_close(head.local_summary(v, a), expected)
    torch.testing.assert_close(head.local_summary(v, a, new=3), expected[:, -3:])


def test_learned_tables_get_the_gradient_indexing_gives_them():
    """``lookup`` (a bincount backward) trains a table as ``table[index]`` would."""
    from cortex_plugins.cognition._pointer_head import lookup

    index = torch.randint(0, 5, (3, 7, 11))
    weight = torch.randn(3, 7, 11)
    grads = []
    for read in (lookup, lambda t, i: t[i]):
        table = torch.randn(5, generator=torch.Generator().manual_seed(0)).requires_grad_()
        (read(table, index) * weight).sum().backward()
        grads.append(table.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().min() > 0


def _head(dim=16, width=8, **options):
    torch.manual_seed(0)
    head = PointerHead(dim, width, gate_bias=0.0, window=4, **options)
    head.idf = lambda w: 1.0
    return head


def test_pointer_is_strictly_causal_and_a_distribution():
    head = _head()
    ids = torch.randint(97, 123, (2, 12))
    head(torch.randn(2, 12, 16))
    q, k, _, _ = head.project(head.hidden)
    a = torch.softmax(head.scores(q, k, head.overlap(ids)), -1).nan_to_num(0.0)
    assert torch.all(a.triu() == 0)  # key j only for j < t
    assert torch.allclose(a[:, 1:].sum(-1), torch.ones(2, 11))


def test_mixture_with_closed_gate_is_the_model():
    head = _head(combine="gate")
    torch.nn.init.constant_(head.gate.bias, -30.0)
    head.log_lexical_gate.data.fill_(-30.0)
    ids = torch.randint(97, 123, (1, 10))
    logits = torch.randn(1, 10, 256)
    head(torch.randn(1, 10, 16))
    targets = torch.randint(97, 123, (1, 10))
    lm = torch.log_softmax(logits, -1)
    assert torch.allclose(head.mixture_log_probs(logits, targets, targets, ids),
                          lm.gather(-1, targets[..., None])[..., 0], atol=1e-4)
    assert torch.allclose(head.sequence_log_probs(logits, ids), lm, atol=1e-4)


def test_word_overlap_points_at_the_named_statement():
    head = _head()
    text = "Bora lives in Daejeon. Tom lives in Tokyo.\nWhere does Bora live? "
    ids = torch.tensor([list(text.encode())])
    lex = head.overlap(ids, last=1)[0, 0]
    assert lex[text.index("Daejeon") - 1] > lex[text.index("Tokyo") - 1]


def test_when_reading_a_told_word_goes_on_after_a_capital():
    """Told "gold", answered "Gold": with ``fold_case`` the reading pointer's token match counts
    "? G" as "s g" (two equal tokens, the copy goes on); training and ``fold_case: false`` match
    bytes exactly."""
    text = b"Her favourite colour is gold.\nWhat is her favourite colour? G"
    ids = torch.tensor([list(text)])
    key = text.index(b"gold")  # the key whose value is "o"
    assert int(match_lengths(ids)[0, -1, key]) == 0
    assert int(match_lengths(ids, fold=True)[0, -1, key]) == 2
    head = _head()
    head.eval()
    assert int(head.matches(ids, 1)[0, -1, key]) == 2
    head.train()
    assert int(head.matches(ids, 1)[0, -1, key]) == 0
    head.eval()
    head.fold_case = False
    assert int(head.matches(ids, 1)[0, -1, key]) == 0


def test_match_length_counts_the_equal_tokens_ending_at_query_and_key():
    text = b"Tavi is a lawyer.\nTavi is "
    ids = torch.tensor([list(text)])
    n = match_lengths(ids)[0, -1]  # the query: the space after the second "is"
    assert int(n[text.index(b"is ") + 2]) == 4  # "s is " ... agrees as far as counted
    assert int(n[text.index(b"a ") + 1]) == 1  # another space: only the current token
    assert int(n[text.index(b"lawyer")]) == 0
    assert torch.equal(match_lengths(ids, last=3), match_lengths(ids)[:, -3:])  # decoding reads the same
    # learned per length: weighting length 4 sends the pointer to the told wording's next token
    head = _head()
    head(torch.zeros(1, ids.shape[1], 16))
    head.match.data[:] = 2.0  # 8 at length 4 (the prior: 1 per token)
    attn = head._attend(ids, last=1)[0][0, 0].detach()
    assert int(attn.argmax()) == text.index(b"is ") + 2 and float(attn.max()) > 0.9


def test_a_later_statement_like_an_earlier_one_supersedes_it():
    text = "Farel lives in Lima. Jun lives in Oslo. Farel lives in Rome.\nWhere does Farel live? "
    ids = torch.tensor([list(text.encode())])
    head = _head()
    head.idf = lambda w: 5.0 if w == b"farel" else 0.0  # only the name is rare
    head(torch.randn(16).expand(1, ids.shape[1], 16))  # equal states: every key alike (cosine 1)
    _, k, _, _ = head.project(head.hidden)
    shared = head.overlap(ids)
    later = head.superseded(ids, k, shared, last=1)[0, 0].detach()
    lima, rome, oslo = (text.index(w) - 1 for w in ("Lima", "Rome", "Oslo"))
    assert float(later[lima]) == pytest.approx(1.0, abs=1e-5)  # Farel's later statement
    assert float(later[rome]) == 0.0 and float(later[oslo]) == 0.0  # nothing later / no shared name
    # causal: within Rome's own sentence, Lima is not yet superseded
    assert float(head.superseded(ids, k, shared)[0, text.index("Farel lives in Rome") + 3, lima].detach()) == 0.0
    # a template word shared with another person's statement does not supersede it
    head.idf = lambda w: {b"farel": 5.0, b"lives": 0.3}.get(w, 0.0)
    head.min_shared = 1.0
    shared = head.overlap(ids)
    later = head.superseded(ids, k, shared, last=1)[0, 0].detach()
    assert float(later[oslo]) == 0.0 and float(later[lima]) == pytest.approx(1.0, abs=1e-5)
    # off: the two statements weigh alike; on (the prior), the later wins
    head.supersede.data.fill_(0.0)
    attn = head._attend(ids, last=1)[0][0, 0].detach()
    assert float(attn[rome]) == pytest.approx(float(attn[lima]), rel=0.3)
    head.supersede.data.fill_(-3.0)
    attn = head._attend(ids, last=1)[0][0, 0].detach()
    assert float(attn[rome]) > 10 * float(attn[lima])


def test_utf8_grammar_keeps_the_pointer_on_values_that_can_come_next():
    text = "한결은 리마에 산다.\n한결은 어디에 살아? "
    ids = torch.tensor([list(text.encode())])
    cont, inside = continues_character(ids)
    assert cont.sum() == 2 * len([c for c in text if ord(c) > 127])  # two continuation bytes a syllable
    assert not inside[0, -1] and inside[0, len("한".encode()) - 2]  # after a space: a new character
    head = _head()
    head(torch.randn(1, ids.shape[1], 16))
    head.utf8 = False
    mid = head._attend(ids, last=1)[0][0, 0].detach()
    values = ids[0, 1:]
    on_continuation = float(mid[:-1][(values >= 0x80) & (values < 0xC0)].sum())
    assert on_continuation > 0.2  # unaware of UTF-8, many keys hold half a character
    head.utf8 = True
    attn = head._attend(ids, last=1)[0][0, 0].detach()
    assert float(attn[:-1][(values >= 0x80) & (values < 0xC0)].sum()) == 0.0
    assert float(attn.sum()) == pytest.approx(1.0)


def test_generation_mixes_the_pointer_from_cached_states():
    head = _head().eval()
    ids = torch.randint(97, 123, (1, 9))
    head(torch.randn(1, 8, 16))  # prefill of 8 positions
    head(torch.randn(1, 1, 16))  # one decoded token
    assert head.hidden.shape[1] == 9
    out = head.mix_last(ids, torch.randn(1, 256))
    assert torch.allclose(out.exp().sum(-1), torch.ones(1), atol=1e-4)


def test_product_of_experts_binds_within_the_models_type_and_has_no_gate():
    head = _head(combine="poe", eps=0.05, beta=1.0, fold_case=True)
    assert not [n for n, _ in head.named_parameters() if "gate" in n]
    logp = torch.log_softmax(torch.randn(1, 260), -1)
    # no pointer mass: the model unchanged
    assert torch.allclose(head.combine_log_probs(logp, torch.zeros(1, 260)), logp, atol=1e-6)
    # the model spreads over "cities" (B, D, T), the pointer says D: D wins
    model = torch.full((1, 260), -20.0)
    model[0, [ord("B"), ord("D"), ord("T")]] = 0.0
    ptr = torch.zeros(1, 260)
    ptr[0, ord("D")] = 0.9
    ptr[0, ord("x")] = 0.1  # a byte the model rules out stays out
    out = head.combine_log_probs(torch.log_softmax(model, -1), ptr)
    assert int(out.argmax()) == ord("D") and float(out[0, ord("x")].exp()) < 1e-6
    # case folding: a told "apples" supports the model's "A" of "Apples."
    model[0, [ord("A"), ord("B")]] = 0.0
    ptr = torch.zeros(1, 260)
    ptr[0, ord("a")] = 1.0
    assert int(head.combine_log_probs(torch.log_softmax(model, -1), ptr).argmax()) == ord("A")
    # the training NLL is a normalised distribution over the vocabulary
    ids = torch.randint(97, 123, (1, 9))
    head(torch.randn(1, 8, 16))
    logits = torch.randn(1, 8, 260)
    total = sum(head.mixture_log_probs(logits, ids[:, 1:], torch.full((1, 8), v), ids[:, :-1]).exp()
                for v in range(260))
    assert torch.allclose(total, torch.ones(1, 8), atol=1e-4)


@pytest.mark.parametrize("fold_case", [True, False])
@pytest.mark.parametrize("copying", [True, False])
def test_the_training_nll_at_the_targets_is_the_full_product(fold_case, copying):
    """Training reads the product of experts at the targets alone (no (B, T, vocab) product):
    the same log-likelihoods and gradients as the full ``combine_log_probs``, padding aside."""
    text = list(b"Mina lives in Busan. Where does mina live? BUSAN. Abc abc xyz!")
    ids = torch.tensor([text[:41], text[6:47]])
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, 3] = -1  # padding
    states = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3))
    logits = torch.randn(2, 40, 260, generator=torch.Generator().manual_seed(4))
    head = _head(combine="poe", fold_case=fold_case, copying=copying)
    if copying:
        head.copy_share.data = torch.tensor([0.3, 0.5])  # an open share: both terms of the mixture count
    valid = targets >= 0
    results = []
    for full in (False, True):
        head(states)
        logits_ = logits.clone().requires_grad_()
        if full:
            attn, _, _, g = head._attend(inputs)
            joint = head.combine_log_probs(torch.log_softmax(logits_, -1), head._scatter(attn, targets, 260)[0], g)
            out = joint.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        else:
            out = head.training_log_probs(logits_, targets, targets, inputs)[0]
        head.zero_grad()
        (out * valid).sum().backward()
        results.append((out.detach()[valid], logits_.grad, [p.grad.clone() for p in head.parameters() if p.grad is not None]))
    (fast, fast_logits, fast_params), (full, full_logits, full_params) = results
    assert torch.allclose(fast, full, atol=1e-5) and torch.allclose(fast_logits, full_logits, atol=1e-6)
    assert len(fast_params) == len(full_params) >= 8
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fast_params, full_params))
    assert float((fast - torch.log_softmax(logits, -1)[valid.nonzero(as_tuple=True)].gather(
        -1, targets[valid][:, None])[:, 0]).abs().max()) > 0.1  # the pointer moved them


def test_a_decoded_token_extends_the_byte_grammar_as_computed_anew():
    """Cached decoding extends the pointer's per-position grammar one token at a time in
    Python: the same sentences, starts, UTF-8 continuations and word bytes as computing the
    whole sequence again, Korean, broken UTF-8 and non-byte tokens included."""
    text = list("Mina lives in 부산. 민아는? 😀 ok!\n".encode()) + [0xA0, 0xA1, 0xE2, 0x82, 300, 0x41, 0xC3]
    rng = random.Random(5)
    rows = torch.tensor([text, [rng.randrange(0, 300) for _ in text]])
    grammar = ByteGrammar(rows[:, :1])
    for t in range(2, rows.shape[1] + 1):
        grammar = grammar.extended(rows[:, :t])
        fresh = ByteGrammar(rows[:, :t])
        assert "sentence" in vars(grammar) and "character" in vars(grammar)  # extended, not recomputed
        for name in ("sentence", "start", "word"):
            assert torch.equal(getattr(grammar, name), getattr(fresh, name)), (name, t)
        assert all(torch.equal(a, b) for a, b in zip(grammar.character, fresh.character)), t
    assert int(grammar.sentence[0, -1]) == 4 and bool(grammar.character[1][0, text.index(0xEB)])


def test_copy_spells_a_told_name_the_models_prior_vetoes():
    """After "Ar" of a told "Aris", a model sure of "Areum" vetoes "i" in the product; the
    copy share, raised by attention on keys continuing the copy, lets the told name through.
    Where the pointer continues nothing the share stays at its floor."""
    text = b"My name is Aris.\nWhat is my name? Ar"
    ids = torch.tensor([list(text)])
    model = torch.zeros(1, 260)
    model[0, ord("e")], model[0, ord("i")] = 10.0, -10.0
    logp = torch.log_softmax(model, -1)
    answers = {}
    for copy in (False, True):
        torch.manual_seed(0)
        head = _head(combine="poe", copying=copy).eval()
        head(torch.randn(16).expand(1, ids.shape[1], 16))  # equal states: the token match decides
        if copy:
            assert [n for n, _ in head.named_parameters() if n == "copy_share"]
            head.copy_share.data[1] = math.log(12.0)
        out = head.mix_last(ids, logp)
        assert torch.allclose(out.exp().sum(-1), torch.ones(1), atol=1e-4)
        answers[copy] = chr(int(out.argmax()))
    assert answers == {False: "e", True: "i"}
    head.copy_share.data[1] = math.log(12.0)
    fresh = torch.tensor([list(b"My name is Aris.\nWhat is my name? Zq")])  # nothing to continue
    head(torch.randn(16).expand(1, fresh.shape[1], 16))
    assert chr(int(head.mix_last(fresh, logp).argmax())) == "e"
    # a saturated share trains without NaN (the mixture is taken in log space)
    head.train()
    head.copy_share.data[:] = torch.tensor([5.0, math.log(1000.0)])
    head(torch.randn(1, ids.shape[1] - 1, 16))  # the states of the inputs, ids[:, :-1]
    t = ids[:, 1:]
    loss = -head.mixture_log_probs(torch.randn(1, t.shape[1], 260), t, t, ids[:, :-1]).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_the_copy_share_takes_only_the_pointer_mass_that_names_a_token():
    """Attention on keys whose told word ends there (a Korean particle) votes for word ends in
    the product and names no token to copy: the mixture still sums to 1, and with no such
    mass it is the plain ``(1 - c) p_poe + c p_ptr``."""
    head = _head(combine="poe", copying=True).eval()
    logp = torch.log_softmax(torch.randn(2, 260), -1)
    ptr = torch.zeros(2, 260)
    ptr[0, ord("k")], ptr[1, ord("k")] = 0.6, 1.0  # row 0: the other 0.4 on a word end
    ends = torch.tensor([[0.4], [0.0]])
    g = torch.tensor([1.5, 1.5])
    out = head.combine_log_probs(logp, ptr, g, ends).exp()
    torch.testing.assert_close(out.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    c = torch.sigmoid(g[1])
    poe = head.combine_log_probs(logp, ptr, None, ends).exp()
    torch.testing.assert_close(out[1], (1 - c) * poe[1] + c * ptr[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], (1 - c * 0.6) * poe[0] + c * ptr[0], atol=1e-5, rtol=0)


def test_copy_share_grows_inside_a_word_not_at_the_next_word():
    """With bytes, a copy's share counts while a word is being spelt or a told statement about
    the same name goes on as told; after "Jun lives in " (the template of "Mina lives in
    Busan." copied) the next word is a binding, not a copy."""
    share = {}
    for name, text in (("next word", b"Mina lives in Busan. Jun lives in "),
                       ("inside a word", b"Mina lives in Busan. Jun lives in"),
                       ("the same name's statement", b"Mina lives in Busan. Mina lives in ")):
        ids = torch.tensor([list(text)])
        head = _head(combine="poe", copying=True).eval()
        head.idf = lambda w: 3.0 if w in (b"mina", b"jun", b"busan") else 0.0  # names weigh, templates not
        head.utf8, head.min_shared = True, 1.5
        head.copy_share.data[1] = math.log(12.0)
        head(torch.randn(16).expand(1, ids.shape[1], 16))  # equal states: the token match decides
        with torch.no_grad():
            share[name] = float(torch.sigmoid(head._attend(ids, last=1)[3][0, -1]))
    assert share["next word"] < 0.01 < 0.5 < min(share["inside a word"], share["the same name's statement"])


def test_particle_keys_mark_where_a_told_korean_word_ends():
    def ends(text: str) -> list[str]:
        ids = torch.tensor([list(text.encode())])
        return [bytes(ids[0, :j + 1].tolist()).decode(errors="replace").split()[-1] for j in
                particle_keys(ids)[0].nonzero().flatten().tolist()]

    assert ends("내 이름은 여울이야.") == ["이름", "여울"]  # the longest particle: 이야, not 야
    assert ends("나는 부산에 산다.") == ["나", "부산", "산"]  # 다 of a verb reads as the copula; no answer copies a verb
    assert ends("고양이를 키워.") == ["고양이"]  # 이 of 고양이 is the word's; 를 is the particle
    assert ends("Mina lives in Busan.") == [] and ends("그는 여울이야") == ["그"]  # a word at the end may go on


def test_word_end_vote_stops_a_copy_before_a_korean_particle():
    """Told "내 이름은 여울이야.", asked "내 이름이 뭐야? 여울": the key after 여울 holds 이 of the
    copula 이야. With bytes its vote goes to the bytes that end a word, so the model's "."
    answers "여울."; without (the vote for 이 as told) the product continues "여울이"."""
    text = "내 이름은 여울이야.\n내 이름이 뭐야? 여울".encode()
    ids = torch.tensor([list(text)])
    model = torch.zeros(1, 260)
    model[0, 0xEB], model[0, 0xEC], model[0, ord(".")] = 1.0, 0.5, 0.3  # a name of 2 or 3 syllables
    logp = torch.log_softmax(model, -1)
    answers = {}
    for utf8 in (False, True):
        head = _head(combine="poe").eval()
        head.utf8 = utf8
        head(torch.randn(16).expand(1, ids.shape[1], 16))  # equal states: the token match decides
        answers[utf8] = int(head.mix_last(ids, logp).argmax())
    assert answers == {False: 0xEC, True: ord(".")}


def test_when_reading_a_word_starts_only_where_a_told_word_started():
    """After "? " the answer's first byte: a Hangul syllable's first byte is one of four, so
    the keys inside 작가 (value 가's first byte) compete with the key before 작가 in the
    told statement. When reading, a key inside a word is not read where a word starts;
    training reads every key."""
    text = "새론은 작가다.\n새론은 무슨 일을 해? ".encode()
    ids = torch.tensor([list(text)])
    word = [0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A or b >= 0x80 for b in text]
    inside = torch.tensor([a and b for a, b in zip(word, word[1:] + [False])])  # a word goes on after the key
    mass = {}
    for training in (True, False):
        head = _head(combine="poe").train(training)
        head.utf8 = True
        head(torch.randn(16).expand(1, ids.shape[1], 16))  # equal states
        with torch.no_grad():
            attn = head._attend(ids, last=1)[0][0, -1]
        mass[training] = float(attn[inside].sum())
    assert mass[True] > 0.3 and mass[False] == 0.0
    assert float(attn[text.index("작가다.".encode()) + 8]) > 0  # the key before "." ends a word: read


def test_look_ahead_keys_read_what_their_finished_sentence_goes_on_to_say():
    """"나는 치즈를 좋아해. 나는 부산에 살아." then a food question: the keys before 치즈 and
    before 부산 are alike (both follow "나는 "); only the end of each sentence says which is a
    food. A key of a finished sentence that reads its sentence's end (here set by hand to
    point the food sentence's keys at the query) is found; without ``look_ahead`` they tie."""
    text = "나는 치즈를 좋아해. 나는 부산에 살아.\n나는 무슨 음식을 좋아해? ".encode()
    ids = torch.tensor([list(text)])
    food_end = text.index("해.".encode()) + 3  # the "." closing the food statement
    states = torch.zeros(1, len(text), 16)
    states[..., 0] = 1.0  # every position alike ...
    states[0, food_end] = torch.eye(16)[1]  # ... but the end of the food statement
    keys = {}
    for ahead in (False, True):
        head = _head(combine="poe", look_ahead=ahead).eval()
        head.idf = lambda w: 0.0  # no word overlap: the keys alone
        head(states)
        with torch.no_grad():
            if ahead:  # the food statement's end, read by its keys, turns them to the query
                q = head.project(head.hidden)[0][0, -1]
                head.key_ahead.weight.copy_(20 * torch.outer(q / q.norm(), head.norm(states[0, food_end])) / 16)
            attn = head._attend(ids, last=1)[0][0, -1]
        keys[ahead] = (float(attn[text.index("치".encode()) - 1]), float(attn[text.index("부".encode()) - 1]))
    assert keys[False][0] == pytest.approx(keys[False][1])
    assert keys[True][0] > 5 * keys[True][1]
    assert PointerHead(16, 8).key_ahead is None  # off by default: runs saved before it load unchanged


def test_restated_bonus_continues_the_same_names_statement_not_the_template():
    """"Mina lives in " after "Mina lives in Busan. Jun lives in Oslo." matches both statements'
    template equally; the ``restated`` bonus (a match in a sentence sharing the name) sends the
    pointer to Busan. Without it (and with the word overlap's own weight off) the two tie."""
    text = b"Mina lives in Busan. Jun lives in Oslo. Mina lives in "
    ids = torch.tensor([list(text)])
    mass = {}
    for restated in (0.0, 2.0):
        head = _head(combine="poe")
        head.idf = lambda w: 3.0 if w in (b"mina", b"jun", b"busan", b"oslo") else 0.0
        head.min_shared = 1.5
        head.log_lexical.data.fill_(-30.0)  # the overlap's own score off: the bonus alone
        head.restated.data.fill_(restated)
        head(torch.randn(16).expand(1, ids.shape[1], 16))  # equal states
        with torch.no_grad():
            attn = head._attend(ids, last=1)[0][0, -1]
        mass[restated] = (float(attn[text.index(b"Busan") - 1]), float(attn[text.index(b"Oslo") - 1]))
    assert mass[0.0][0] == pytest.approx(mass[0.0][1], rel=1e-4) and mass[0.0][0] > 0.05
    assert mass[2.0][0] > 5 * mass[2.0][1]


def test_direct_loss_sends_the_pointer_to_the_answers_key_where_the_product_does_not():
    """After "? " the answer "D" of "Bora lives in D." is held by the key before it. A model
    already sure of "D" leaves the product's NLL nothing to gain from where the pointer
    looks; the pointer's own likelihood (``reader/direct``) still moves it to the answer (as
    it must for the next answer, which the model will not know)."""
    text = b"Bora lives in D. Where does Bora live? D"
    ids = torch.tensor([list(text)])
    inputs, targets = ids[:, :-1], ids[:, 1:]
    logits = torch.zeros(1, inputs.shape[1], 260)
    logits[0, -1, ord("D")] = 10.0  # the model is sure of the answer
    answer_key = text.index(b"D") - 1  # its value is "D"
    mass = {}
    for direct in (False, True):
        head = _head(combine="poe")
        states = torch.randn(1, inputs.shape[1], 16, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD(head.parameters(), lr=0.2)  # Adam would blow up a vanishing gradient
        for _ in range(20):
            head(states)
            joint, own = head.training_log_probs(logits, targets, targets, inputs)
            loss = -joint[0, -1] - (own[0, -1] if direct else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            head(states)
            attn = head._attend(inputs)[0]
        mass[direct] = float(attn[0, -1, answer_key])
        assert torch.isnan(own[0, 0])  # nothing to point at from the first position
    assert mass[True] > 0.8 and mass[True] > mass[False] + 0.3


def test_the_defaults_are_the_best_measured_setting():
    s = Reader.Settings()
    assert (s.combine, s.eps, s.read_eps, s.beta, s.fold_case) == ("poe", 0.05, 0.01, 1.0, True)


# -- told text -------------------------------------------------------------------------

def _reader(**settings):
    return Reader(Reader.Settings(background=300, **settings), context=None)


def test_recall_reads_a_told_name_and_nothing_unrelated():
    r = _reader()
    r.remember("Aris lives in Busan.", "s")
    r.remember("Bexa is a teacher.", "s")
    assert r.recall("Where does Aris live?", "s") == ["Aris lives in Busan."]
    assert r.recall("Where does Mina live?", "s") == []  # specificity: a never-told name
    assert r.recall("What is Gaeun's locker number?", "s") == []
    assert r.recall("Where does Aris live?", "other") == []  # sessions are separate


def test_recall_reads_the_statement_sharing_the_name_not_every_one_sharing_the_wording():
    told = [f"{n} can be reached on extension {v}." for n, v in [("Jory", 6833), ("Kasia", 8844), ("Lumi", 8332)]]
    r, everything = _reader(), _reader(keep=0.0)  # off: every text sharing a rare word is read
    for text in told:
        r.remember(text, "s")
        everything.remember(text, "s")
    assert r.recall("Kasia can be reached on extension", "s") == [told[1]]
    assert everything.recall("Kasia can be reached on extension", "s") == told
    r.remember("Kasia moved to extension 1200.", "s")  # two statements about the name: both read
    assert r.recall("Which extension reaches Kasia?", "s") == [told[1], "Kasia moved to extension 1200."]


def test_recall_gives_closed_class_words_no_weight(monkeypatch):
    """"How old am I?" shares "I" with both told texts and "am" with the small talk: "am",
    never in the demo corpus, would weigh as a name and leave the age statement unread."""
    import cortex_plugins.cognition.reader as reader_module

    told = ["I'm 60 years old.", "I am a bit tired today."]
    for function_words, read in ((reader_module.FUNCTION_WORDS, True), (frozenset(), False)):
        monkeypatch.setattr(reader_module, "FUNCTION_WORDS", function_words)
        r = _reader()
        for text in told:
            r.remember(text, "s")
        assert ("I'm 60 years old." in r.recall("How old am I?", "s")) is read


def test_a_prompt_sharing_no_word_reads_its_speakers_statements():
    """"What is my job?" shares no word with "I am a nurse." ("my" against "I"), yet both are
    about the session's speaker; the same in Korean ("내" against "나"). A prompt that shares a
    word reads only what shares it, as before."""
    r = _reader()
    for text in ("I am a nurse.", "나는 부산에 살아.", "Bexa is a teacher."):
        r.remember(text, "s")
    assert r.recall("What is my job?", "s") == ["I am a nurse.", "나는 부산에 살아."]
    assert r.recall("내 직업은 뭐야?", "s") == ["I am a nurse.", "나는 부산에 살아."]
    assert r.recall("나는 어디에 살아?", "s") == ["나는 부산에 살아."]
    assert r.recall("What is Bexa's job?", "s") == ["Bexa is a teacher."]
    assert r.recall("What is your job?", "s") == []  # the second person is not the speaker
    r.remember("하람에게는 내선 3456번으로 연락하면 된다.", "s")  # 내선 (extension) is not 내 (my)
    assert r.recall("내가 좀 피곤해.", "s") == ["I am a nurse.", "나는 부산에 살아."]
    r.remember("My name is Aris.", "s")
    assert r.recall("What is my name?", "s") == ["My name is Aris."]
    assert r.recall("What is my job?", "s") == ["My name is Aris."]  # "my" is shared: no fallback


def test_a_long_told_text_is_read_by_the_sentences_about_the_asked_name():
    """Told texts are kept sentence by sentence: a question reads its name's statements, not
    the other people's told with them (which, put before it, pushed the asked statement out
    of a small context)."""
    told = "Mia's favourite colour is silver. Aris likes potatoes. Bexa is a teacher!\nAris lives in Busan."
    r = _reader()
    assert r.remember(told, "s") == 4
    assert r.recall("What does Aris like to eat?", "s") == ["Aris likes potatoes.", "Aris lives in Busan."]
    assert r.recall("What is Bexa's job?", "s") == ["Bexa is a teacher!"]
    assert r.recall("Where does Mina live?", "s") == []


def test_recall_keeps_told_order_so_the_later_statement_is_nearer():
    r = _reader()
    r.remember("Aris lives in Busan.", "s")
    r.remember("Aris moved to Rome.", "s")
    assert r.context_for("Where does Aris live?", "s") == (
        "Aris lives in Busan. Aris moved to Rome.\nWhere does Aris live?")


def test_told_texts_are_bounded_and_saved():
    r = _reader(max_texts=2)
    for i in range(3):
        r.remember(f"Text {i}.", "s")
    assert r.texts["s"] == ["Text 1.", "Text 2."]
    other = _reader()
    other.load_state_dict(r.state_dict())
    assert other.texts == r.texts


# -- the demo corpus's updates -----------------------------------------------------------

def test_demo_default_corpus_is_unchanged_by_the_updates_setting():
    text = "\x00".join(d.text for d in demo_documents(500))
    # the first 500 documents as generated before `updates` existed
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "bce34ff9c27edf2bd3c8f0a0c1bfc3cd4a63f13aa7e3010cbccfed6f2fadd05a")


def test_demo_updates_ask_the_later_city():
    rng = random.Random(3)
    for _ in range(40):
        world = make_world(rng, korean=False, kind="facts", updates=1.0)
        body = world.text.split("\n")[0]
        moved = [s for s in body.split(". ") if "moved to" in s or "lives in" in s]
        asked = [a.rstrip(".") for q, a in world.qa if q.startswith("Where does")]
        assert asked and len(moved) >= 2
        name = next(q for q, _ in world.qa if q.startswith("Where does")).split()[2]
        told = [s for s in moved if s.startswith(name) or s.startswith(f"Correction: {name}")]
        if len(told) >= 2:  # the person told twice: the question asks the later city
            assert any(told[-1].rstrip(".").endswith(a) for a in asked)


def test_demo_restates_current_statements_word_for_word():
    rng = random.Random(5)
    restated = 0
    for _ in range(60):
        world = make_world(rng, korean=False, kind="facts", updates=0.5, restate=1.0)
        body, *lines = world.text.split("\n")
        questions = {f"{q} {a}" for q, a in world.qa}
        extra = [line for line in lines if line not in questions]
        assert 1 <= len(extra) <= 2 and all(line in body for line in extra)  # repeated as told
        assert len(lines) == len(world.qa) + len(extra)
        restated += len(extra)
        cities = [s.split(" lives in ")[0].split(" moved to ")[0].removeprefix("Correction: ")
                  for s in body.split(". ") if " lives in " in s or " moved to " in s]
        twice = {n for n in cities if cities.count(n) > 1}
        assert not any(line.startswith(n) and (" lives in " in line or " moved to " in line)
                       for line in extra for n in twice)  # never a city told twice (one is stale)
    assert restated > 60
    assert "\x00".join(d.text for d in demo_documents(50)) == "\x00".join(
        d.text for d in demo_documents(50, restate=0.0))


def test_demo_coined_names_are_made_up_and_never_a_benchmark_name():
    """A share of people get a made-up name, in both languages; none is a name the benchmarks
    ask about as never seen in training (reads' new names, facts' held-out names)."""
    from cortex_plugins.bench.heldout_templates import NAMES as HELD_OUT
    from cortex_plugins.bench.reads import NEW_NAMES
    from cortex_plugins.data.demo import NAMES, coined_name

    worlds = list(demo_worlds(400, coined=0.5))
    people = [p.name for w in worlds for p in w.people]
    made_up = [n for n in people if n not in NAMES]
    assert 0.4 < len(made_up) / len(people) < 0.6
    assert {len(en) for en, _ in made_up} >= {4, 6, 8} and {len(ko) for _, ko in made_up} == {2, 3}
    assert all(en in w.text or ko in w.text for w in worlds for p in w.people for en, ko in [p.name])
    assert set(NEW_NAMES) <= set(HELD_OUT)
    named = " ".join(f"{en} {ko}" for en, ko in people).lower()
    assert not [name for pair in HELD_OUT for name in pair if name.lower() in named]  # not even inside a name
    rng = random.Random(0)
    assert len({coined_name(rng) for _ in range(200)}) == 200  # rarely the same twice
    assert "\x00".join(d.text for d in demo_documents(50)) == "\x00".join(
        d.text for d in demo_documents(50, coined=0.0))


# -- the model consults the reader -------------------------------------------------------

@pytest.fixture
def reader_model(build_model):
    model = build_model(tiny_manifest(dim=32, layers=2, context=96, seed=0,
                                      features=[{"type": "reader", "settings": {"background": 200}}]))
    return model.eval()


def _reader_of(model) -> Reader:
    return next(f for f in model.features if isinstance(f, Reader))


def test_the_reader_is_a_cognitive_feature_the_model_consults():
    assert Reader.adjust_logits is not CognitiveFeature.adjust_logits
    assert Reader.context_for is not CognitiveFeature.context_for


def test_pointer_on_binds_the_asked_name_in_an_untrained_model(reader_model):
    """No weights set by hand: the word overlap alone sends the pointer to the statement
    about the asked name, and the product of experts then prefers its value."""
    prompt = "Zorblat lives in Qwixburg. Mina lives in Seoul.\nWhere does Zorblat live? "
    head = _reader_of(reader_model).head

    def confidences():
        return [reader_model.confidence(prompt, answer) for answer in ("Qwixburg.", "Seoul.")]

    asked, other = confidences()
    head.enabled = False
    asked_off, other_off = confidences()
    head.enabled = True
    assert asked > 2 * other  # the asked person's city, not the other's (whose later letters the
    # token-match prior also copies once its first letter is given)
    assert asked > 3 * asked_off  # the pointer changes what the model expects
    assert 0.5 < asked_off / other_off < 2  # the untrained core alone cannot tell them apart


def test_where_the_pointer_sees_nothing_the_model_is_unchanged(reader_model):
    reader = _reader_of(reader_model)
    ids = torch.tensor([list(b"Hello there, a few words.")])
    logits, _ = reader_model.core(ids)
    combined = reader.adjust_logits(ids, logits, "self")
    model = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(combined[:, 0], model[:, 0], atol=1e-5)  # position 0: no key
    assert not torch.allclose(combined[:, 5:], model[:, 5:], atol=1e-3)  # later: the pointer reads
    reader.head.enabled = False
    assert torch.allclose(reader.adjust_logits(ids, logits, "self"), model, atol=1e-5)


def test_told_text_is_put_before_a_related_prompt(reader_model):
    reader = _reader_of(reader_model)
    assert reader_model.remember("Zorblat lives in Qwixburg.", session="s") == 1  # no tiers: the reader kept it
    reader_model.generate_text("Where does Zorblat live?", session="s", max_new_tokens=2)
    reader_model.generate_text("What is the weather like?", session="s", max_new_tokens=2)
    assert reader.counters == {"recalled": 1, "prompts": 2}
    reader_model.interact("Gorplex likes apples.", session="s", max_new_tokens=2)
    assert reader.texts["s"] == ["Zorblat lives in Qwixburg.", "Gorplex likes apples."]
    assert reader_model.plugin_state()[reader.key] == {"texts": reader.texts}


def test_remember_without_tiers_or_a_reader_is_still_an_error(build_model):
    with pytest.raises(CortexError, match="no memory tiers"):
        build_model(tiny_manifest()).remember("Mina lives in Busan.")


def test_training_adds_the_pointer_loss_with_gradients_into_the_core(reader_model):
    reader_model.train()
    batch = torch.tensor([list(b"Bora lives in Daejeon. Where does Bora live? Daejeon.")])
    logits, loss = reader_model(batch[:, :-1], batch[:, 1:])
    losses = [r for r in reader_model.pm.hook.cortex_extra_losses(model=reader_model, batch=batch, logits=logits) if r]
    pointer = losses[0]["reader/pointer"]
    assert torch.isfinite(pointer)
    (loss + pointer).backward()
    head = _reader_of(reader_model).head
    assert head.log_lexical.grad is not None and head.query.weight.grad.abs().sum() > 0
    assert reader_model.core.blocks[0].attn.proj.weight.grad.abs().sum() > 0


def test_train_rows_trains_the_pointer_on_the_first_rows_alone(reader_model):
    """``train_rows: 0.5`` of a batch of 4: the pointer's loss is the loss of rows 0-1 read alone,
    whatever rows 2-3 hold, and no gradient reaches the later rows' states."""
    reader_model.train()
    reader = _reader_of(reader_model)
    texts = [b"Bora lives in Daejeon. Where does Bora live? Daejeon.", b"Mina is 34 years old. How old is Mina? 34.",
             b"Jun likes tea. What does Jun like to eat? Tea. Jun has 2 cats.", b"Sora is a nurse. What is Sora's job?"]
    batch = torch.tensor([list(t[:36]) for t in texts])

    def pointer_loss(batch, share):
        reader.settings.train_rows = share
        logits, _ = reader_model(batch[:, :-1], batch[:, 1:])
        states = reader.head.hidden
        states.retain_grad()
        loss = [r for r in reader_model.pm.hook.cortex_extra_losses(model=reader_model, batch=batch, logits=logits)
                if r][0]["reader/pointer"]
        loss.backward()
        return loss, states.grad

    half, grad = pointer_loss(batch, 0.5)
    alone, _ = pointer_loss(batch[:2], 1.0)
    other_rows, _ = pointer_loss(torch.cat([batch[:2], batch[2:].flip(1)]), 0.5)
    whole, whole_grad = pointer_loss(batch, 1.0)
    assert torch.allclose(half, alone, atol=1e-5) and torch.allclose(half, other_rows, atol=1e-5)
    assert grad[2:].abs().sum() == 0 and grad[:2].abs().sum() > 0  # the later rows' states never enter it
    assert whole_grad[2:].abs().sum() > 0
    assert not torch.allclose(half, whole, atol=1e-4)  # all four rows: another loss


def test_the_reader_reads_before_knn_lm_with_memory_tiers(build_model):
    model = build_model(tiny_manifest(dim=32, layers=2, context=96, memory=[{"type": "stm"}],
                                      memory_system={"read": ["knn_lm"]},
                                      features=[{"type": "reader", "settings": {"background": 200}}])).eval()
    assert model.remember("Zorblat lives in Qwixburg.", session="s") > 1  # the tiers' entries
    assert _reader_of(model).texts["s"] == ["Zorblat lives in Qwixburg."]
    answer = model.generate_text("Where does Zorblat live?", session="s", max_new_tokens=4)
    assert isinstance(answer, str)
    assert 0 < model.confidence("Where does Zorblat live?", " Qwixburg.", session="s") <= 1


def test_knn_lm_keys_the_prompt_not_the_told_text_put_in_front_of_it(build_model):
    """The reader puts told text before the prompt for its pointer; kNN-LM still keys what the
    user wrote, as it would without the reader (its stored keys were made without that text)."""
    model = build_model(tiny_manifest(dim=32, layers=2, context=96, memory=[{"type": "stm"}],
                                      memory_system={"read": ["knn_lm"]},
                                      features=[{"type": "reader", "settings": {"background": 200}}])).eval()
    model.remember("Zorblat lives in Qwixburg.", session="s")
    prompt = "Zorblat lives in"
    read, start = model._read_ids(prompt, "s")
    own = model.tokenizer.encode(prompt)
    assert start == len(read) - len(own) > 0 and read[start:] == own
    assert model._read_ids("Where is the station?", "s") == (model.tokenizer.encode("Where is the station?"), 0)
    system, seen = model.memory_system, []
    for name in ("knn_lm_next", "knn_lm_logits"):  # record what kNN-LM is asked, then ask it
        real = getattr(system, name)
        setattr(system, name, lambda ids, *a, _real=real, **k: seen.append(ids[0].tolist()) or _real(ids, *a, **k))
    model.generate_text(prompt, session="s", max_new_tokens=3)
    assert seen[0] == own and seen[1][:len(own)] == own  # then one more token each step
    seen.clear()
    model.confidence(prompt, " Qwixburg.", session="s")
    assert seen == [own + model.tokenizer.encode(" Qwixburg")]


def test_knn_lm_reads_only_the_told_texts_the_reader_recalled(build_model):
    """With ``lm_recalled_only`` a question reads, of memory, the told texts whose sentences
    the reader put before it: not a template another text shares ("... locker number is")."""
    def build(recalled_only):
        return build_model(tiny_manifest(dim=32, layers=2, context=96, memory=[{"type": "stm"}],
                                         memory_system={"read": ["knn_lm"], "lm_recalled_only": recalled_only},
                                         features=[{"type": "reader", "settings": {"background": 200}}])).eval()
    model = build(True)
    asked, other = "Hi there. Zorblat's locker number is 4270.", "Quentavius's locker number is 2869."
    model.remember(asked, session="s")
    model.remember(other, session="s")
    read, start = model._read_ids("What is Zorblat's locker number?", "s")
    told = model._told_before(torch.tensor([read]), start)
    assert told(asked) and not told(other) and not told(None)  # a sentence of it was put before the prompt
    seen = []
    real = model.memory_system.knn_lm_next
    model.memory_system.knn_lm_next = lambda *a, **k: seen.append(k["told"]) or real(*a, **k)
    model.generate_text("What is Zorblat's locker number?", session="s", max_new_tokens=2)
    assert seen and all(t(asked) and not t(other) for t in seen)
    assert build(False)._told_before(torch.tensor([read]), start) is None  # reads every told text


@pytest.mark.parametrize("options", [dict(copying=True, look_ahead=True), dict(combine="gate")])
def test_cached_decoding_reads_as_the_whole_sequence_does(options):
    """Generation keeps each position's keys, bags, overlap and marks between tokens; what it
    reads at every step equals the pointer over the whole sequence computed afresh."""
    head = PointerHead(24, 8, window=4, **options)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # away from the priors: every term counts
    head.idf = lambda w: float(sum(w) % 5)
    head.utf8, head.min_shared = True, 1.0
    head.eval()
    texts = ["Mina lives in Busan. Jun lives in Seoul. 민아는 부산에 산다. Mina moved to Daegu! Where does Mina live? Da",
             "나는 치즈를 좋아해. 지훈이야.\nJun's pin is 4821. Jun lives in Seoul. What is Jun's pin? 48"]
    T = min(len(t.encode()) for t in texts)
    ids = torch.tensor([list(t.encode()[:T]) for t in texts])
    states, logits = torch.randn(2, T, 24), torch.randn(2, T, 256)
    head(states[:, :12])  # the prompt, then one token at a time
    for t in range(12, T):
        if t > 12:
            head(states[:, t - 1:t])
        got = head.mix_last(ids[:, :t], logits[:, t - 1])
        fresh = PointerHead(24, 8, window=4, **options)
        fresh.load_state_dict(head.state_dict())
        fresh.idf, fresh.utf8, fresh.min_shared = head.idf, True, 1.0
        fresh.eval()
        fresh.hidden = states[:, :t]
        want = fresh.sequence_log_probs(logits[:, :t], ids[:, :t])[:, -1]
        assert torch.allclose(got, want, atol=1e-4), t
        assert torch.allclose(head.mix_last(ids[:, :t], logits[:, t - 1]), got)  # asked again: the same
    assert head._decoding.length == T - 1  # the rows were kept, not recomputed
