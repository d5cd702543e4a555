"""Memory keys that carry their sentence's rare words (``memory_system.key_words``): a question
meets the statements naming its name, whatever their wording; rarity is counted from what
memory writes; generation's keys are the written ones; the counts are saved with the run."""

from __future__ import annotations

import random

import pytest
import torch

from cortex import CortexError
from cortex.core.memory import KeyStream
from cortex.core.words import SentenceWords, sentence_words
from cortex.runtime.bpe import train_bpe
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLD = "Hana is an accountant. Emma lives in Oslo. Emma is a judge. Hana lives in Lima. Jun is a cook."
ASKED = "What is Hana's job? An "


def background(n: int = 400, seed: int = 0) -> str:
    """Statements about a hundred people in four templates: names rare, templates common."""
    rng = random.Random(seed)
    names = [f"Pers{i}on" for i in range(100)]
    return " ".join(f"{rng.choice(names)} {rng.choice(['is a cook', 'lives in Rome', 'likes tea', 'is 30 years old'])}."
                    for _ in range(n))


def counted(dim: int = 64) -> SentenceWords:
    words = SentenceWords(dim)
    words.count([list(background().encode())])
    return words


def test_rarity_is_counted_from_the_sentences_written():
    words = counted()
    assert words.sentences == 400
    assert sentence_words(list("민아는 부산에 산다. Mina's cat!".encode())) == [
        {w.encode() for w in ("민아는", "민아", "부산에", "부산", "산다", "산")}, {b"mina", b"cat"}]  # particles cut
    template, name, unseen = words.rarity([b"lives", b"pers7on", b"hana"]).tolist()
    assert template == 0.0  # in a quarter of the sentences: more common than COMMON_SHARE
    assert 0.5 < name < unseen  # a name in about 1 % of them, a word never counted rarer still
    assert SentenceWords(64).rarity([b"lives"]).item() == 0.0  # nothing counted: log(1 / 0.5) < log(16)


def test_a_questions_words_point_to_the_statements_naming_its_name():
    words = counted()
    told = words.directions(torch.tensor([list(TOLD.encode())]))[0]
    asked = words.directions(torch.tensor([list(ASKED.encode())]))[0, -1]
    before = {value: TOLD.index(value) - 1 for value in ("accountant", "Oslo", "Lima", "cook")}
    cos = {value: float(told[p] @ asked) for value, p in before.items()}
    assert cos["accountant"] > 0.5 and cos["Lima"] > 0.3  # Hana's statements
    assert abs(cos["Oslo"]) < 0.2 and cos["cook"] == 0.0  # another name's; template words only
    # the last positions alone are those of the whole sequence
    whole = words.directions(torch.tensor([list(TOLD.encode())]))
    assert torch.allclose(words.directions(torch.tensor([list(TOLD.encode())]), last=7), whole[:, -7:])


def manifest(key_words: float, tokenizer: dict | None = None) -> str:
    return tiny_manifest(
        "words", dim=64, context=128, tokenizer=tokenizer,
        memory=[{"type": "stm", "settings": {"capacity": 512, "threshold": 0.999}}],
        memory_system={"read": ["knn_lm"], "key_layer": 0, "key_window": 8, "key_offsets": [0, 1, 2, 4],
                       "key_words": key_words},
    )


@pytest.mark.parametrize("key_words", [0.0, 1.0])
def test_a_question_key_meets_the_asked_persons_statement_only_with_words(build_model, key_words):
    torch.manual_seed(0)
    model = build_model(manifest(key_words)).eval()
    model.remember(background())  # what memory is told counts towards rarity
    ms = model.memory_system
    assert (ms.words is not None) == bool(key_words) and (not key_words or ms.words.sentences == 400)
    told = ms.keys(torch.tensor([list(TOLD.encode())]))[0]
    asked = ms.keys(torch.tensor([list(ASKED.encode())]))[0, -1]
    hana = float(told[TOLD.index("accountant") - 1] @ asked)
    others = max(float(told[TOLD.index(v) - 1] @ asked) for v in ("Oslo", "judge", "cook"))
    if key_words:
        assert hana > others + 0.2
    else:
        assert hana < others + 0.1  # the keys alone see "is an " and "is a ": no name


def test_generation_keys_are_the_written_keys_with_words(build_model):
    torch.manual_seed(0)
    ms = build_model(manifest(1.0)).eval().memory_system
    ms.words.count([list(background().encode())])
    stream = KeyStream(ms)
    ids = torch.tensor([list((TOLD + " " + ASKED + "accountant. Where does Emma live? In Oslo.").encode())])
    for T in range(40, ids.shape[1], 3):
        key, _ = stream.last(ids[:, :T])
        window = ids[:, :T][:, -ms.key_span():]
        torch.testing.assert_close(key, ms.keys(window, context=ids[:, :T])[:, -1], atol=1e-5, rtol=0)
        if T <= 128:  # within the context: the keys of the whole sequence
            torch.testing.assert_close(key, ms.keys(ids[:, :T])[:, -1], atol=1e-5, rtol=0)
    end = TOLD.index("Lima") + 2  # "Hana lives in Li": its sentence began before the last 12 bytes
    assert not torch.allclose(ms.keys(ids[:, end - 12:end])[:, -1], ms.keys(ids[:, :end])[:, -1])


def test_word_counts_are_saved_with_the_memory_state(build_model):
    model = build_model(manifest(1.0))
    model.remember(background(50))
    state = model.memory_system.state_dict()
    assert model.memory_system.words.sentences == 50 and int(state["word_counts"].sum()) > 50
    fresh = build_model(manifest(1.0), name="again.yaml").memory_system
    fresh.load_state_dict(state)
    assert fresh.words.sentences == 50 and torch.equal(fresh.words.counts, model.memory_system.words.counts)
    plain = build_model(manifest(0.0), name="plain.yaml").memory_system
    assert "word_counts" not in plain.state_dict()
    fresh.load_state_dict(plain.state_dict())  # a state from before key_words: the counts stay
    assert fresh.words.sentences == 50


def test_key_words_need_a_byte_tokenizer(build_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(background(200), encoding="utf-8")
    train_bpe([corpus], 300, tmp_path / "tokenizer.json")
    with pytest.raises(CortexError, match=r"key_words .*tokenizer: \{type: byte\}"):
        build_model(manifest(1.0, tokenizer={"type": "bpe", "path": "tokenizer.json"}))
    assert build_model(manifest(0.0, tokenizer={"type": "bpe", "path": "tokenizer.json"}), name="b.yaml").memory_system


def test_a_frontier_read_keys_the_prompts_last_position_with_its_whole_sentence(build_model):
    model = build_model(tiny_manifest(
        "frontier", dim=64, context=128, memory_layers=[1],
        memory=[{"type": "stm", "settings": {"capacity": 512}}],
        memory_system={"read": ["knn_attention"], "key_layer": 0, "key_window": 8, "key_offsets": [0, 1, 2, 4],
                       "key_words": 1.0, "query": "key", "value": "next", "read_at": "frontier"})).eval()
    ms = model.memory_system
    model.remember(background(100))
    ids = torch.tensor([list(TOLD[: TOLD.index("Lima") + 2].encode())])  # "... Hana lives in Li"
    read = ms.generation_read(torch.tensor([0]), None)(ids, ids.shape[1])  # the prompt, read at its end
    assert read.frontier and read.keys.shape == (1, 1, 64)
    torch.testing.assert_close(read.keys[:, 0], ms.keys(ids)[:, -1], atol=1e-5, rtol=0)
