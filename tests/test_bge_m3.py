"""bge_m3: BGE-M3 embeddings as keys of text-level memories.

Two groups of tests:

- the ones at module level run in every environment (the core one too): the clear errors
  without the extra or the weights, the CLI, and the store's logic with a stand-in encoder;
- ``TestWithTheExtra`` (marked ``bge``) needs the ``bge`` extra and is collected only where
  FlagEmbedding is installed. ``.ci/bge`` builds that environment, runs this file there and
  fails if any of those tests is missing or skipped. Its fixture builds a tiny random
  XLM-RoBERTa model and tokenizer with the installed (pinned) transformers: no download.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import BuildContext
from cortex.kernel.manifest import ManifestError, load_manifest_text
from cortex_plugins.cognition import bge_m3
from cortex_plugins.cognition.bge_m3 import BgeM3, extra_installed
from tests.conftest import tiny_manifest

HAVE_BGE = extra_installed()

# its own text: a test checks the file:line of the settings
MANIFEST = """\
cortex: 1
name: bge
seed: 0
model: {{dim: 32, layers: 1, heads: 2, context: 64}}
tokenizer: {{type: byte}}
features:
  - type: bge_m3
    settings: {settings}
"""


def manifest(path: Path | str, **settings) -> str:
    return MANIFEST.format(settings=json.dumps({"path": str(path), **settings}))


def fake_weights(root: Path) -> Path:
    """A folder that looks like BGE-M3 weights (the files exist; their content does not load)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (root / name).write_text("{}", encoding="utf-8")
    return root


@pytest.fixture
def no_extra(monkeypatch):
    """FlagEmbedding cannot be imported, as in an environment without the extra."""
    monkeypatch.setitem(sys.modules, "FlagEmbedding", None)


@pytest.fixture
def extra_present(monkeypatch):
    """The settings check believes the extra is installed (for tests of later errors)."""
    monkeypatch.setattr(bge_m3, "extra_installed", lambda: True)


# ---------------------------------------------------------------------- errors (any environment)


def test_the_module_imports_without_flagembedding_or_transformers():
    code = ("import sys; sys.modules['FlagEmbedding'] = None; import cortex_plugins.cognition.bge_m3 as m; "
            "assert 'transformers' not in sys.modules; print(m.BgeM3.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "bge_m3"


def test_without_the_extra_validate_and_build_say_how_to_install_it(no_extra, tmp_path, cortex_cli):
    path = tmp_path / "m.yaml"
    path.write_text(manifest(fake_weights(tmp_path / "bge-m3")), encoding="utf-8")
    for command in (("validate", path), ("build", path, "-o", tmp_path / "runs")):
        result = cortex_cli(*command)
        assert result.exit_code == 1, result.output
        assert "pip install 'cortex[bge]'" in result.output
        assert f"{path}:8:" in result.output  # file:line of the settings
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_weights_name_the_path_and_how_to_point_to_them(tmp_path, cortex_cli):
    path = tmp_path / "m.yaml"
    path.write_text(manifest("/nonexistent"), encoding="utf-8")
    for command in (("validate", path), ("build", path, "-o", tmp_path / "runs")):
        result = cortex_cli(*command)
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())  # undo the console's line wrapping
        assert "no BGE-M3 weights at /nonexistent: no such directory" in text
        assert "--local-dir" in text and "set `path:`" in text
        assert "Traceback" not in result.output


def test_both_problems_are_reported_at_once(no_extra):
    with pytest.raises(ManifestError) as err:
        load_manifest_text(manifest("/nonexistent"))
    assert "pip install 'cortex[bge]'" in str(err.value) and "/nonexistent" in str(err.value)


def test_an_incomplete_folder_names_the_missing_files(tmp_path, extra_present):
    folder = tmp_path / "bge-m3"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        load_manifest_text(manifest(folder))
    message = str(err.value)
    assert str(folder) in message and "model weights" in message and "tokenizer" in message
    assert "config.json" not in message.split("missing", 1)[1].split(";")[0]


def test_a_relative_path_is_resolved_from_the_working_directory(tmp_path, monkeypatch, extra_present):
    fake_weights(tmp_path / "models" / "bge-m3")
    monkeypatch.chdir(tmp_path)
    built = load_manifest_text(manifest("models/bge-m3"))
    component = BgeM3(built.components[0].settings, BuildContext())
    assert component.path == tmp_path / "models" / "bge-m3"


def test_a_broken_flagembedding_import_is_a_clear_error(tmp_path, extra_present, no_extra):
    settings = BgeM3.Settings(path=str(fake_weights(tmp_path / "w")))
    feature = BgeM3(settings, BuildContext())
    with pytest.raises(CortexError, match=r"transformers<5.*pip install 'cortex\[bge\]'"):
        feature.embed("hello")


def test_weights_that_disappeared_after_validation_are_a_clear_error(tmp_path, extra_present):
    folder = fake_weights(tmp_path / "w")
    feature = BgeM3(BgeM3.Settings(path=str(folder)), BuildContext())
    (folder / "model.safetensors").unlink()
    with pytest.raises(CortexError, match="no BGE-M3 weights at .*missing model weights"):
        feature.load()


def test_of_finds_the_feature_or_says_how_to_add_it(build_model):
    model = build_model(tiny_manifest("bge", seed=0, layers=1, context=64, tokenizer={"type": "byte"}))
    with pytest.raises(CortexError, match="no bge_m3 feature"):
        BgeM3.of(model)


# ---------------------------------------------------------------------- the store, with a stand-in encoder


class WordHashEncoder:
    """A deterministic stand-in for BGEM3FlagModel: hashed bag of words, 64-d, unit norm."""

    def __init__(self):
        self.calls = 0

    def encode(self, texts, **kwargs):
        import numpy as np

        self.calls += 1
        out = np.zeros((len(texts), 64), dtype=np.float32)
        lexical = []
        for i, text in enumerate(texts):
            words = text.lower().split()
            for w in words:
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
            out[i] /= max(np.linalg.norm(out[i]), 1e-9)
            lexical.append({str(zlib.crc32(w.encode()) % 1000): 0.5 for w in words})
        return {"dense_vecs": out, "lexical_weights": lexical if kwargs.get("return_sparse") else None}


def stand_in(tmp_path, **settings) -> BgeM3:
    feature = BgeM3(BgeM3.Settings(path=str(fake_weights(tmp_path / "w")), **settings), BuildContext())
    feature._embedder = WordHashEncoder()
    return feature


def test_store_search_sessions_and_refresh(tmp_path, extra_present):
    bge = stand_in(tmp_path)
    bge.remember_text("the cat sat on the mat", "a")
    bge.remember_text("stock prices fell sharply today", "a")
    bge.remember_text("the cat sat on the mat", "b")
    assert len(bge) == 3
    hits = bge.search("where did the cat sit", k=2, session="a")
    assert [h.text for h in hits] == ["the cat sat on the mat", "stock prices fell sharply today"]
    assert hits[0].score > hits[1].score and hits[0].session == "a"
    assert bge.search("anything", session="nobody") == []
    again = bge.remember_text("the cat sat on the mat", "a")  # refreshed, not stored twice
    assert again == hits[0].id and len(bge) == 3 and bge.counters["refreshed"] == 1
    assert bge.recall_context("cat", session="a", min_score=0.3) == "the cat sat on the mat\n"
    assert bge.recall_context("cat", session="a", min_score=0.99) == ""
    assert bge.forget("b") == 1 and bge.texts_of("b") == [] and len(bge) == 2


def test_capacity_evicts_the_least_recently_used_never_the_new_text(tmp_path, extra_present):
    bge = stand_in(tmp_path, capacity=3)
    for text in ("alpha one", "beta two", "gamma three"):
        bge.remember_text(text)
    bge.search("alpha one", k=1)  # alpha becomes recently used
    bge.remember_text("delta four")
    assert sorted(bge.texts_of()) == ["alpha one", "delta four", "gamma three"]
    bge.remember_text("epsilon five")
    assert sorted(bge.texts_of()) == ["alpha one", "delta four", "epsilon five"]
    assert len(bge) == 3 and bge.counters["evicted"] == 2


def test_search_without_touch_changes_nothing(tmp_path, extra_present):
    bge = stand_in(tmp_path)
    bge.remember_text("alpha one")
    before = (bge.uses.clone(), bge.last.clone(), bge.clock)
    bge.search("alpha", touch=False)
    assert torch.equal(bge.uses, before[0]) and torch.equal(bge.last, before[1]) and bge.clock == before[2]


def test_sparse_weight_adds_the_lexical_score(tmp_path, extra_present):
    folder = fake_weights(tmp_path / "w")
    (folder / "sparse_linear.pt").write_bytes(b"")
    bge = BgeM3(BgeM3.Settings(path=str(folder), sparse_weight=0.5), BuildContext())
    bge._embedder = WordHashEncoder()
    bge.remember_text("red apple pie")
    hit = bge.search("red apple pie")[0]
    assert hit.lexical == pytest.approx(3 * 0.25) and hit.score == pytest.approx(hit.dense + 0.5 * hit.lexical)


def test_state_round_trip_needs_no_re_embedding(tmp_path, extra_present):
    bge = stand_in(tmp_path, capacity=5)
    for i, text in enumerate(("alpha one", "beta two", "gamma three")):
        bge.remember_text(text, session=f"s{i % 2}", meta={"i": i})
    state = bge.state_dict()
    fresh = stand_in(tmp_path)
    fresh.load_state_dict(state)
    assert fresh.texts == bge.texts and fresh.sessions == bge.sessions and fresh.meta == bge.meta
    assert torch.equal(fresh.keys, bge.keys) and torch.equal(fresh.ids, bge.ids)
    empty = stand_in(tmp_path)
    empty.load_state_dict(stand_in(tmp_path).state_dict())
    assert len(empty) == 0


# ---------------------------------------------------------------------- with the extra (its own venv)


def build_tiny_bge(folder: Path) -> Path:
    """A tiny random XLM-RoBERTa (BGE-M3's architecture) with a Unigram tokenizer and the
    sparse and ColBERT heads, saved by the installed transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    # a fixed Unigram vocabulary (the trainer is not deterministic): the corpus's words,
    # preferred, and its characters, so that every text can be segmented
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    words = sorted({"\u2581" + w for text in CORPUS for w in text.split()})
    chars = sorted({c for text in CORPUS for c in text if c != " "} | {"\u2581"})
    vocab = [(t, 0.0) for t in specials] + [(w, -5.0) for w in words] + [(c, -10.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    cls, sep = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", cls), ("</s>", sep)])
    XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=128,
    ).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # a wide initialisation: with the default (0.02) every text's CLS vector of a random
        # model is the same to 5 digits; at 0.5 different texts stay below cosine 0.96
        config = XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2, initializer_range=0.5)
        XLMRobertaModel(config).save_pretrained(folder)
        torch.save(torch.nn.Linear(32, 32).state_dict(), folder / "colbert_linear.pt")
        torch.save(torch.nn.Linear(32, 1).state_dict(), folder / "sparse_linear.pt")
    return folder


CORPUS = [
    "the cat sat on the mat",
    "a dog barked at the mailman",
    "my name is Ana and I live in Seoul",
    "the meeting moved to Friday afternoon",
    "water boils at one hundred degrees",
    "고양이가 매트 위에 앉았다",
    "제 이름은 아나이고 서울에 살아요",
    "der Hund bellt den Briefträger an",
    "memory is the key to learning",
    "the train to Busan leaves at noon",
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny model's folder (built once per test module)."""
    return build_tiny_bge(tmp_path_factory.mktemp("tiny-bge-m3"))


@pytest.fixture(scope="module")
def bge(weights) -> BgeM3:
    """A ``bge_m3`` feature on the tiny model, with the sparse head in its score."""
    return BgeM3(BgeM3.Settings(path=str(weights), sparse_weight=0.3), BuildContext())


class _ExtraTests:
    """Load, embed, store, retrieve and persist with the real FlagEmbedding."""

    pytestmark = pytest.mark.bge

    def test_loads_from_the_local_path_without_touching_the_random_stream(self, weights):
        from FlagEmbedding import BGEM3FlagModel

        feature = BgeM3(BgeM3.Settings(path=str(weights)), BuildContext())
        state = torch.random.get_rng_state()
        assert isinstance(feature.load(), BGEM3FlagModel) and feature.load() is feature.load()
        assert torch.equal(torch.random.get_rng_state(), state)

    def test_embeddings_have_the_model_width_unit_norm_and_are_deterministic(self, bge, weights):
        dense = bge.embed(CORPUS)
        assert dense.shape == (len(CORPUS), 32) and dense.dtype == torch.float32
        assert torch.allclose(dense.norm(dim=-1), torch.ones(len(CORPUS)), atol=1e-5)
        assert bge.embed(CORPUS[0]).shape == (32,)
        assert torch.equal(bge.embed(CORPUS), dense)
        other = BgeM3(BgeM3.Settings(path=str(weights)), BuildContext())  # a second load: same vectors
        assert torch.allclose(other.embed(CORPUS), dense, atol=1e-6)
        sims = dense @ dense.T - 2 * torch.eye(len(CORPUS))
        assert sims.max() < 0.99  # different texts get different keys
        _, lexical = bge.encode(CORPUS[:2])
        assert all(lexical) and all(isinstance(w, float) and w > 0 for x in lexical for w in x.values())

    def test_every_stored_text_is_its_own_nearest_neighbour_within_its_session(self, weights):
        bge = BgeM3(BgeM3.Settings(path=str(weights)), BuildContext())
        for text in CORPUS:
            bge.remember_text(text, session="ana")
        bge.remember_text("a secret only bob knows", session="bob")
        for text in CORPUS:
            hits = bge.search(text, k=3, session="ana")
            assert hits[0].text == text and hits[0].dense == pytest.approx(1.0, abs=1e-5)
            assert hits[0].score > hits[1].score + 0.01
        assert all(h.session == "ana" for h in bge.search("a secret only bob knows", k=20, session="ana"))
        assert [h.text for h in bge.search("a secret only bob knows", k=20, session="bob")] == [
            "a secret only bob knows"]
        assert bge.recall_context(CORPUS[2], session="ana", k=1, min_score=0.99) == CORPUS[2] + "\n"

    def test_the_hybrid_score_adds_the_weighted_lexical_match(self, bge):
        bge.forget()
        for text in CORPUS:
            bge.remember_text(text, session="hybrid")
        hits = bge.search("the cat sat on the mat", k=len(CORPUS), session="hybrid")
        assert hits[0].text == "the cat sat on the mat" and hits[0].lexical > 0
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        for hit in hits:
            assert hit.score == pytest.approx(hit.dense + 0.3 * hit.lexical, abs=1e-5)
        assert any(h.lexical == 0 for h in hits)  # texts sharing no token with the query

    def test_chat_turns_are_stored_and_survive_save_and_load(self, weights, build_model, tmp_path):
        from cortex.runtime.rundir import load_run, save_run

        model = build_model(manifest(weights, capacity=8))
        for turn in CORPUS[:4]:
            model.interact(turn, session="ana", max_new_tokens=2)
        model.interact(CORPUS[4], session="bob", max_new_tokens=2)
        bge = BgeM3.of(model)
        assert bge.texts_of("ana") == CORPUS[:4] and bge.texts_of("bob") == [CORPUS[4]]
        assert bge.meta[0]["source"] == "chat" and "response" in bge.meta[0]
        before = [(h.text, h.score) for h in bge.search(CORPUS[2], k=4, session="ana", touch=False)]
        run = save_run(model, tmp_path / "runs")
        loaded = BgeM3.of(load_run(run))
        assert loaded._embedder is None  # the keys came from the run, not from re-embedding
        assert torch.equal(loaded.keys, bge.keys) and loaded.texts == bge.texts and loaded.sessions == bge.sessions
        after = [(h.text, h.score) for h in loaded.search(CORPUS[2], k=4, session="ana", touch=False)]
        assert [t for t, _ in after] == [t for t, _ in before] and after[0][0] == CORPUS[2]
        assert all(math.isclose(a[1], b[1], abs_tol=1e-5) for a, b in zip(after, before))

    def test_the_model_reads_told_text_through_bge_m3_above_the_floor_only(self, weights, build_model):
        """The tiny random encoder has no sense of meaning, so the floor is set between the
        scores it gives; what is checked is the read path: told, scored, floored, put back."""
        model = build_model(manifest(weights))
        bge = BgeM3.of(model)
        assert model.remember(CORPUS[1], session="ana") == 1 and model.remember(CORPUS[3], session="ana") == 1
        assert bge.texts_of("ana") == [CORPUS[1], CORPUS[3]] and bge.meta[0]["source"] == "told"
        question = "what happened to the mailman?"
        (best, high), (other, low) = [(h.text, h.score) for h in bge.search(question, k=2, session="ana", touch=False)]
        assert high > low
        bge.settings.min_score = (high + low) / 2
        read = bge.context_for(question, session="ana")
        assert read == f"{best}\n{question}" and other not in read.replace(question, "")
        assert model._read_prompt(question, session="ana") == read  # the model consults it
        assert bge.context_for(question, session="bob") == question  # another session: nothing
        bge.settings.min_score = low - 0.01  # both: oldest first
        assert bge.context_for(question, session="ana") == f"{CORPUS[1]} {CORPUS[3]}\n{question}"
        uses = bge.uses.clone()
        model.generate_text(question, session="ana", max_new_tokens=2)
        assert torch.equal(bge.uses, uses)  # reading strengthened nothing
        bge.settings.read = False
        assert model._read_prompt(question, session="ana") == question

    def test_missing_or_unloadable_weights_are_clear_errors(self, weights, tmp_path):
        import shutil

        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(ManifestError, match=f"no BGE-M3 weights at {empty}: missing config.json"):
            load_manifest_text(manifest(empty))
        broken = tmp_path / "broken"
        shutil.copytree(weights, broken)
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        feature = BgeM3(BgeM3.Settings(path=str(broken)), BuildContext())
        with pytest.raises(CortexError, match=f"the weights at {broken} cannot be loaded"):
            feature.embed("hello")


if HAVE_BGE:  # collected only where the extra is installed; `.ci/bge` checks none is skipped
    TestWithTheExtra = _ExtraTests
