"""The demo corpus: deterministic, bilingual in the asked proportion, and self-consistent."""

from __future__ import annotations

import random
import re

import pytest

from cortex.kernel.interfaces import BuildContext, DataSource, Document
from cortex.kernel.plugins import CortexPluginManager
from cortex_plugins.data import demo
from cortex_plugins.data.demo import DemoSource, demo_documents, has_final_consonant, make_world

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HANGUL = re.compile(r"[\uac00-\ud7a3]")


def is_korean(doc: Document) -> bool:
    return bool(HANGUL.search(doc.text))


def test_deterministic_per_seed():
    a = list(demo_documents(200, seed=3))
    assert a == list(demo_documents(200, seed=3))
    assert [d.text for d in a] != [d.text for d in demo_documents(200, seed=4)]
    assert a[:50] == list(demo_documents(50, seed=3))  # a prefix does not depend on n
    assert a[7].origin == "demo:3:7"
    assert len({d.text for d in a}) == len(a)  # no duplicates


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_korean_share(share):
    docs = list(demo_documents(1000, seed=1, korean=share))
    korean = sum(is_korean(d) for d in docs) / len(docs)
    assert korean == pytest.approx(share, abs=0.05)
    if share == 0.0:
        assert not any(is_korean(d) for d in docs)


# patterns that state a fact (plain statements or dialogue answers) and that ask it back
EN = {
    "city": ([r"(\w+) lives in ([A-Z][\w ]*)\.", r"^(\w+): I live in ([\w ]+)\."], r"Where does (\w+) live\? ([\w ]+)\."),
    "age": ([r"(\w+) is (\d+) years old\.", r"^(\w+): I'm (\d+) years old\."], r"How old is (\w+)\? (\d+)\."),
    "locker": ([r"(\w+)'s locker number is (\d+)\.", r"^(\w+): My locker number is (\d+)\."], r"What is (\w+)'s locker number\? (\d+)\."),
    "colour": ([r"(\w+)'s favourite colour is ([a-z ]+)\.", r"^(\w+): My favourite colour is ([a-z ]+)\."], r"What is (\w+)'s favourite colour\? ([A-Za-z ]+)\."),
}
KO = {
    "city": ([r"(?<!\S)(\S+?)[은는] (\S+)에 산다\.", r"^(\S+): 나는 (\S+)에 살아\."], r"(?<!\S)(\S+?)[은는] 어디에 살아\? (\S+)\."),
    "age": ([r"(?<!\S)(\S+?)[은는] (\d+)살이다\.", r"^(\S+): 나는 (\d+)살이야\."], r"(?<!\S)(\S+?)[은는] 몇 살이야\? (\d+)살\."),
    "locker": ([r"(?<!\S)(\S+)의 사물함 번호는 (\d+)번이다\.", r"^(\S+): 내 사물함 번호는 (\d+)번이야\."], r"(?<!\S)(\S+)의 사물함 번호는 뭐야\? (\d+)번\."),
}


def test_answers_match_the_facts_of_the_same_document():
    checked = {"en": 0, "ko": 0}
    for doc in demo_documents(600, seed=5):
        lang = "ko" if is_korean(doc) else "en"
        for stated, asked in (KO if lang == "ko" else EN).values():
            facts: dict[str, str] = {}
            for pattern in stated:
                for name, value in re.findall(pattern, doc.text, flags=re.M):
                    assert facts.setdefault(name, value) == value
            for name, answer in re.findall(asked, doc.text):
                assert name in facts, (name, doc.text)
                assert answer.lower() == facts[name].lower(), doc.text
                checked[lang] += 1
    assert checked["en"] > 150 and checked["ko"] > 100


def test_worlds_ask_only_about_what_they_told():
    rng = random.Random(0)
    for i in range(300):
        world = make_world(rng, korean=i % 2 == 0, kind=("facts", "dialogue")[i % 3 == 0])
        body, _, questions = world.text.partition("\n" + world.qa[0][0])
        assert 2 <= len(world.qa) <= 5
        assert world.text.endswith("\n".join(f"{q} {a}" for q, a in world.qa))
        for _, answer in world.qa:
            core = answer.rstrip(".").removesuffix("살").removesuffix("마리").removesuffix("번")
            if not world.korean:
                core = core.removeprefix("A ").removeprefix("An ")
            assert core.lower() in body.lower(), (answer, world.text)
        if world.kind == "dialogue":
            speakers = {line.split(":")[0] for line in body.splitlines()}
            assert len(speakers) == 2


def test_korean_particles():
    assert has_final_consonant("준") and not has_final_consonant("민아")
    assert "준은 " in make_world_with_name("준") and "민아는 " in make_world_with_name("민아")


def make_world_with_name(korean_name: str) -> str:
    original = demo.NAMES
    try:
        demo.NAMES = [("X", korean_name), ("Y", "하나"), ("Z", "서준"), ("W", "소라")]
        return "\n".join(make_world(random.Random(s), korean=True, kind="facts").text for s in range(20))
    finally:
        demo.NAMES = original


def test_demo_source_component():
    assert issubclass(DemoSource, DataSource) and DemoSource.name == "demo"
    settings = DemoSource.Settings(documents=30, seed=2, korean=0.5)
    docs = list(DemoSource(settings, BuildContext()).documents())
    assert docs == list(demo_documents(30, seed=2, korean=0.5))
    assert DemoSource.Settings().documents == 20000
    for bad in ({"documents": 0}, {"korean": 1.5}, {"korean": -0.1}, {"colour": "red"}):
        with pytest.raises(ValueError):
            DemoSource.Settings(**bad)
    pm = CortexPluginManager()  # the hookspecs alone; the demo plugin registers through them
    pm.register(demo)
    registered = []
    pm.hook.cortex_register_components(register=registered.append)
    assert registered == [DemoSource]
