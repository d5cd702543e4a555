"""The memory keys of generation (KeyStream) and of writes (chosen positions) are the keys of
``MemorySystem.keys``: computed once per token or only where written, never different."""

from __future__ import annotations

import pytest
import torch

from cortex.core.memory import KeyStream, session_stream
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def manifest(key_layer: int = 0, key_window: int = 8, context: int = 48) -> str:
    return tiny_manifest(
        "keys", dim=32, context=context,
        memory=[{"type": "stm", "settings": {"capacity": 256, "threshold": 0.999}},
                {"type": "ltm", "settings": {"capacity": 4096}}],
        memory_system={"read": ["knn_lm"], "key_layer": key_layer, "key_window": key_window,
                       "key_offsets": [0, 1, 2, 4, 8]},
    )


@pytest.mark.parametrize("key_layer, key_window", [(0, 8), (1, 6), (1, 0)])
def test_a_key_stream_gives_the_keys_of_the_window_at_every_token(build_model, key_layer, key_window):
    torch.manual_seed(0)
    ms = build_model(manifest(key_layer, key_window)).eval().memory_system
    stream = KeyStream(ms)
    ids = torch.randint(0, 256, (2, 130))  # past the context (48) twice: the cache starts again
    restarts = 0
    for T in range(3, ids.shape[1]):
        before = stream.cache.length
        key, position = stream.last(ids[:, :T])
        restarts += stream.cache.length != before + 1
        window = ids[:, :T][:, -ms.key_span():]
        assert position == window.shape[1] - 1
        torch.testing.assert_close(key, ms.keys(window)[:, -1], atol=1e-5, rtol=0)
    # an unrelated sequence is noticed and computed afresh
    other = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(stream.last(other)[0], ms.keys(other)[:, -1], atol=1e-5, rtol=0)
    if key_window:
        assert restarts < 10  # one token at a time, apart from the starts after a full cache
    else:
        assert restarts > 80  # unbounded window: every key past the context needs the window again


def test_keys_at_chosen_positions_are_those_of_all_positions(build_model):
    ms = build_model(manifest(1, 6)).eval().memory_system
    idx = torch.randint(0, 256, (3, 48))
    rows, cols = (torch.rand(3, 48, generator=torch.Generator().manual_seed(1)) < 0.3).nonzero(as_tuple=True)
    assert torch.equal(ms.keys(idx, at=(rows, cols)), ms.keys(idx)[rows, cols])


def test_generation_reads_memory_through_the_key_stream_as_token_by_token_keys_would(build_model):
    torch.manual_seed(0)
    model = build_model(manifest(context=64)).eval()
    ms = model.memory_system
    logits = torch.randn(1, 256)
    assert torch.equal(ms.knn_lm_next(torch.zeros(1, 5, dtype=torch.long), logits, 0),
                       torch.log_softmax(logits, dim=-1))  # nothing held: the model's own
    told = "The pass key of the blue door is 48213, said the guard at the gate. "
    model.remember(told * 2)
    prompt = torch.tensor([model.tokenizer.encode(told[:30])])
    new = 150  # past the context: the core and the key stream both start again
    streamed = model.generate(prompt, new, temperature=0.0)
    stream = session_stream("self")
    fresh = model.core.generate(prompt, new, temperature=0.0,
                                adjust=lambda ids, scores: ms.knn_lm_next(ids, scores, stream))
    assert torch.equal(streamed, fresh)
    text = model.tokenizer.decode(streamed[0, prompt.shape[1]:].tolist())
    assert text.startswith(told[30:])  # memory was read: the untrained core alone says nothing of it


def test_where_remember_cuts_a_long_text_into_windows_does_not_show_in_its_keys(build_model):
    """A text longer than the context is stored window by window; the keys of positions just
    after a cut still read the tokens before it, as the key of the same position in one pass."""
    torch.manual_seed(0)
    model = build_model(manifest(key_layer=1, key_window=6, context=48))
    ms = model.memory_system
    ids = torch.randint(0, 256, (150,))
    model.remember(model.tokenizer.decode(ids.tolist()))
    told = torch.tensor(model.tokenizer.encode(model.tokenizer.decode(ids.tolist())))
    span, stream = ms.key_span(), session_stream("self")
    for cut in (48, 96):
        for p in (cut + 1, cut + 4, cut + 9):
            whole = ms.keys(told[p - span + 1:p + 1][None])[:, -1]  # the key with all it reads
            cut_off = ms.keys(told[cut:p + 1][None])[:, -1]  # read from the window's start only
            assert float(whole @ cut_off.T) < (0.99 if p < cut + 8 else 0.9999)  # the cut would show
            found = ms.tiers[0].read(whole, 1, stream=stream, step=0, touch=False)
            assert float(found.scores[0, 0]) > 0.9999 and int(found.tokens[0, 0]) == int(told[p + 1])
