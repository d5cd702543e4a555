"""The ``demo`` data source: a synthetic bilingual (Korean/English) corpus, made offline.

Each document is a small world. A few people get a few facts each (where they live, their
job, age, favourite colour, pets, favourite food, locker number), told either as plain
statements or as a dialogue in which they answer each other's questions; the document then
asks questions whose answers are stated earlier in the same document::

    Mina lives in Busan. Jun is a teacher. Mina is 34 years old.
    Where does Mina live? Busan.
    How old is Mina? 34.

    민아: 준아, 어디에 살아?
    준: 나는 부산에 살아.
    준은 어디에 살아? 부산.

A model trained on it has to copy from its context and bind names to facts, which is what
memory components are measured on. Everything is drawn from built-in word lists by a
seeded ``random.Random`` per document, so document ``i`` of a seed is always the same
(and the first ``n`` documents do not depend on how many are asked for).

```yaml
train:
  data: {type: demo, settings: {documents: 20000, seed: 0, korean: 0.5}}
```
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import DataError
from cortex.kernel.interfaces import DataSource, Document, Settings

# --------------------------------------------------------------------------- word lists
# (English, Korean) pairs, so the same world can be told in either language.

NAMES = [
    ("Mina", "민아"), ("Jun", "준"), ("Jiwoo", "지우"), ("Seojun", "서준"), ("Hana", "하나"),
    ("Minho", "민호"), ("Yuna", "유나"), ("Doyun", "도윤"), ("Sora", "소라"), ("Taeyang", "태양"),
    ("Eunji", "은지"), ("Hyunwoo", "현우"), ("Jisoo", "지수"), ("Siwoo", "시우"), ("Nari", "나리"),
    ("Woojin", "우진"), ("Haneul", "하늘"), ("Somin", "소민"), ("Daeho", "대호"), ("Yerin", "예린"),
    ("Jihun", "지훈"), ("Subin", "수빈"), ("Kyungmin", "경민"), ("Areum", "아름"), ("Sejin", "세진"),
    ("Boram", "보람"), ("Chanwoo", "찬우"), ("Dahye", "다혜"), ("Gaeun", "가은"), ("Hyejin", "혜진"),
    ("Inho", "인호"), ("Jaemin", "재민"), ("Minseo", "민서"), ("Sungho", "성호"), ("Yejin", "예진"),
    ("Taemin", "태민"), ("Bora", "보라"), ("Seoyeon", "서연"), ("Dongha", "동하"), ("Juhee", "주희"),
    ("Anna", "안나"), ("Ben", "벤"), ("Chloe", "클로이"), ("David", "데이비드"), ("Emma", "엠마"),
    ("Felix", "펠릭스"), ("Grace", "그레이스"), ("Henry", "헨리"), ("Lucy", "루시"), ("Leo", "레오"),
    ("Mia", "미아"), ("Noah", "노아"), ("Olivia", "올리비아"), ("Sam", "샘"), ("Tom", "톰"),
    ("Zoe", "조이"),
]

CITIES = [
    ("Seoul", "서울"), ("Busan", "부산"), ("Incheon", "인천"), ("Daegu", "대구"), ("Daejeon", "대전"),
    ("Gwangju", "광주"), ("Ulsan", "울산"), ("Suwon", "수원"), ("Jeonju", "전주"),
    ("Gangneung", "강릉"), ("Jeju", "제주"), ("Pohang", "포항"), ("Chuncheon", "춘천"),
    ("Gyeongju", "경주"), ("Mokpo", "목포"), ("Yeosu", "여수"), ("Tokyo", "도쿄"), ("Osaka", "오사카"),
    ("Paris", "파리"), ("London", "런던"), ("Berlin", "베를린"), ("Rome", "로마"), ("Madrid", "마드리드"),
    ("Sydney", "시드니"), ("Toronto", "토론토"), ("Chicago", "시카고"), ("Boston", "보스턴"),
    ("Seattle", "시애틀"), ("Cairo", "카이로"), ("Lima", "리마"), ("Oslo", "오슬로"), ("Hanoi", "하노이"),
    ("Bangkok", "방콕"), ("Lisbon", "리스본"), ("Dublin", "더블린"), ("Prague", "프라하"),
    ("New York", "뉴욕"), ("Hong Kong", "홍콩"),
]

JOBS = [
    ("teacher", "교사"), ("doctor", "의사"), ("nurse", "간호사"), ("cook", "요리사"),
    ("police officer", "경찰관"), ("firefighter", "소방관"), ("lawyer", "변호사"), ("reporter", "기자"),
    ("painter", "화가"), ("singer", "가수"), ("actor", "배우"), ("farmer", "농부"),
    ("fisher", "어부"), ("baker", "제빵사"), ("programmer", "프로그래머"), ("engineer", "엔지니어"),
    ("architect", "건축가"), ("scientist", "과학자"), ("pharmacist", "약사"), ("pilot", "조종사"),
    ("photographer", "사진작가"), ("writer", "작가"), ("musician", "음악가"), ("designer", "디자이너"),
    ("bus driver", "버스 기사"), ("bank clerk", "은행원"), ("hairdresser", "미용사"),
    ("dentist", "치과의사"), ("vet", "수의사"), ("accountant", "회계사"), ("translator", "번역가"),
    ("gardener", "정원사"), ("mail carrier", "집배원"), ("carpenter", "목수"), ("judge", "판사"),
    ("librarian", "사서"), ("astronaut", "우주비행사"), ("dancer", "무용수"), ("tailor", "재단사"),
]

COLOURS = [
    ("red", "빨간색"), ("orange", "주황색"), ("yellow", "노란색"), ("green", "초록색"), ("blue", "파란색"),
    ("navy", "남색"), ("purple", "보라색"), ("pink", "분홍색"), ("white", "흰색"), ("black", "검은색"),
    ("grey", "회색"), ("brown", "갈색"), ("gold", "금색"), ("silver", "은색"), ("sky blue", "하늘색"),
]

# (singular, plural, Korean)
ANIMALS = [
    ("cat", "cats", "고양이"), ("dog", "dogs", "강아지"), ("rabbit", "rabbits", "토끼"),
    ("hamster", "hamsters", "햄스터"), ("turtle", "turtles", "거북이"), ("parrot", "parrots", "앵무새"),
    ("goldfish", "goldfish", "금붕어"), ("chicken", "chickens", "닭"), ("duck", "ducks", "오리"),
    ("horse", "horses", "말"), ("goat", "goats", "염소"), ("hedgehog", "hedgehogs", "고슴도치"),
    ("lizard", "lizards", "도마뱀"), ("frog", "frogs", "개구리"), ("pig", "pigs", "돼지"),
]

FOODS = [
    ("apples", "사과"), ("bananas", "바나나"), ("grapes", "포도"), ("strawberries", "딸기"),
    ("peaches", "복숭아"), ("oranges", "오렌지"), ("watermelon", "수박"), ("noodles", "국수"),
    ("kimchi", "김치"), ("bread", "빵"), ("rice cakes", "떡"), ("dumplings", "만두"), ("pizza", "피자"),
    ("cheese", "치즈"), ("ice cream", "아이스크림"), ("fried chicken", "치킨"), ("tofu", "두부"),
    ("bibimbap", "비빔밥"), ("cucumbers", "오이"), ("potatoes", "감자"),
]

ATTRIBUTES = ("city", "job", "age", "colour", "pets", "food", "locker")

# --------------------------------------------------------------------------- Korean grammar


def has_final_consonant(word: str) -> bool:
    """Whether the last syllable of ``word`` ends in a consonant (받침), for choosing particles."""
    last = word[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28 != 0
    return last in "013678"  # 영 일 삼 육 칠 팔


def _topic(w: str) -> str:
    return w + ("은" if has_final_consonant(w) else "는")


def _subject(w: str) -> str:
    return w + ("이" if has_final_consonant(w) else "가")


def _object(w: str) -> str:
    return w + ("을" if has_final_consonant(w) else "를")


def _is(w: str) -> str:  # plain copula: 교사다 / 경찰관이다
    return w + ("이다" if has_final_consonant(w) else "다")


def _is_casual(w: str) -> str:  # 교사야 / 경찰관이야
    return w + ("이야" if has_final_consonant(w) else "야")


def _call(w: str) -> str:  # vocative: 준아 / 민아야
    return w + ("아" if has_final_consonant(w) else "야")


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# --------------------------------------------------------------------------- worlds


@dataclass
class Person:
    """One person of a world: an (English, Korean) name and drawn attribute values."""

    name: tuple[str, str]
    facts: dict[str, object] = field(default_factory=dict)


@dataclass
class DemoWorld:
    """A generated document with its structure, for benchmarks that need the answers."""

    korean: bool
    kind: str  # "facts", "dialogue" or "self"
    people: list[Person]
    #: (question, answer) pairs asked at the end, in order
    qa: list[tuple[str, str]]
    text: str


#: (English, Korean) names the corpus never uses, not even inside a coined name: the
#: benchmarks ask about them as names never seen in training
UNSEEN_NAMES = [
    ("Aris", "가람"), ("Bexa", "누리"), ("Corin", "다온"), ("Dovi", "라온"), ("Elno", "벼리"),
    ("Farel", "새론"), ("Gisa", "아라"), ("Halvo", "여울"), ("Irma", "초롱"), ("Joska", "한결"),
    ("Kelmi", "은솔"), ("Lorn", "해찬"), ("Meru", "도담"), ("Nalo", "미르"), ("Orsa", "슬기"),
    ("Quen", "온유"), ("Rafi", "윤슬"), ("Selo", "하람"), ("Tavi", "로운"), ("Vesna", "나래"),
    ("Brisa", "가온"), ("Cato", "나봄"), ("Delmi", "다솜"), ("Edda", "늘봄"), ("Fenna", "단비"),
    ("Galo", "라엘"), ("Hesper", "별하"), ("Ilka", "샛별"), ("Jory", "아토"), ("Kasia", "예솔"),
    ("Lumi", "이든"), ("Marit", "재이"), ("Nerys", "찬솔"), ("Oswin", "태리"), ("Pella", "하음"),
    ("Rune", "해솔"), ("Sabra", "휘윤"), ("Tamsin", "시아"), ("Ulla", "로하"), ("Wren", "세온"),
]
#: letters of coined English names; Hangul initials, vowels and finals (jamo indices) of Korean ones
_CONSONANTS, _VOWELS, _FINALS = "bdfghklmnprstvz", "aeiou", "lmnrs"
_INITIALS, _MEDIALS, _CODAS = (0, 2, 3, 5, 6, 7, 9, 11, 12, 18), (0, 1, 4, 5, 8, 13, 18, 20), (4, 8, 16, 21)


def coined_name(rng: random.Random) -> tuple[str, str]:
    """A made-up name of two or three syllables in each language ("Tavrel", "Kelo"; "도윤람",
    "세마"), some closed by a consonant, never one of ``NAMES`` or ``UNSEEN_NAMES`` or
    containing one of the latter. Half begin as a name of ``NAMES`` does (its first two
    letters, its first syllable: "Ar" of Areum, "Arilo"), so that a told name is copied
    where the model's prior would finish the name it knows. As an answer only copying can
    give it, and its varied shape teaches no length or ending."""
    while True:
        english = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + (rng.choice(_FINALS) if rng.random() < 0.3
                                                                           else "")
                          for _ in range(rng.randint(2, 3))).capitalize()
        korean = "".join(chr(0xAC00 + (rng.choice(_INITIALS) * 21 + rng.choice(_MEDIALS)) * 28
                             + (rng.choice(_CODAS) if rng.random() < 0.3 else 0)) for _ in range(rng.randint(2, 3)))
        if rng.random() < 0.5:  # begins like a known name
            known = rng.choice(NAMES)
            english, korean = known[0][:2] + english[2:], known[1][0] + korean[1:]
        if not any(english == en or korean == ko for en, ko in NAMES) and not any(
                en.lower() in english.lower() or ko in korean for en, ko in UNSEEN_NAMES):
            return english, korean


def _draw_people(rng: random.Random, coined: float = 0.0) -> list[Person]:
    count = rng.randint(2, 4)
    names = rng.sample(NAMES, count)
    if coined > 0:
        names = [coined_name(rng) if rng.random() < coined else name for name in names]
    # distinct values per attribute within a world: answers must come from binding name to fact
    pools = {
        "city": rng.sample(CITIES, count),
        "job": rng.sample(JOBS, count),
        "age": rng.sample(range(18, 80), count),
        "colour": rng.sample(COLOURS, count),
        "pets": [(a, rng.randint(1, 9)) for a in rng.sample(ANIMALS, count)],
        "food": rng.sample(FOODS, count),
        "locker": rng.sample(range(100, 10000), count),
    }
    people = []
    for i, name in enumerate(names):
        chosen = rng.sample(ATTRIBUTES, rng.randint(2, 4))
        people.append(Person(name, {a: pools[a][i] for a in chosen}))
    return people


def _statement(p: Person, attr: str, ko: bool) -> str:
    v = p.facts[attr]
    if ko:
        n = p.name[1]
        return {
            "city": lambda: f"{_topic(n)} {v[1]}에 산다.",
            "job": lambda: f"{_topic(n)} {_is(v[1])}.",
            "age": lambda: f"{_topic(n)} {v}살이다.",
            "colour": lambda: f"{_subject(n)} 좋아하는 색은 {_is(v[1])}.",
            "pets": lambda: f"{_topic(n)} {v[0][2]} {v[1]}마리를 키운다.",
            "food": lambda: f"{_topic(n)} {_object(v[1])} 좋아한다.",
            "locker": lambda: f"{n}의 사물함 번호는 {v}번이다.",
        }[attr]()
    n = p.name[0]
    return {
        "city": lambda: f"{n} lives in {v[0]}.",
        "job": lambda: f"{n} is {_article(v[0])}.",
        "age": lambda: f"{n} is {v} years old.",
        "colour": lambda: f"{n}'s favourite colour is {v[0]}.",
        "pets": lambda: f"{n} has {v[1]} {v[0][0] if v[1] == 1 else v[0][1]}.",
        "food": lambda: f"{n} likes {v[0]}.",
        "locker": lambda: f"{n}'s locker number is {v}.",
    }[attr]()


def _question(p: Person, attr: str, ko: bool) -> tuple[str, str]:
    v = p.facts[attr]
    if ko:
        n = p.name[1]
        return {
            "city": lambda: (f"{_topic(n)} 어디에 살아?", f"{v[1]}."),
            "job": lambda: (f"{_topic(n)} 무슨 일을 해?", f"{v[1]}."),
            "age": lambda: (f"{_topic(n)} 몇 살이야?", f"{v}살."),
            "colour": lambda: (f"{_subject(n)} 좋아하는 색은 뭐야?", f"{v[1]}."),
            "pets": lambda: (f"{_topic(n)} {_object(v[0][2])} 몇 마리 키워?", f"{v[1]}마리."),
            "food": lambda: (f"{_topic(n)} 무슨 음식을 좋아해?", f"{v[1]}."),
            "locker": lambda: (f"{n}의 사물함 번호는 뭐야?", f"{v}번."),
        }[attr]()
    n = p.name[0]
    return {
        "city": lambda: (f"Where does {n} live?", f"{v[0]}."),
        "job": lambda: (f"What is {n}'s job?", f"{_cap(_article(v[0]))}."),
        "age": lambda: (f"How old is {n}?", f"{v}."),
        "colour": lambda: (f"What is {n}'s favourite colour?", f"{_cap(v[0])}."),
        "pets": lambda: (f"How many {v[0][1]} does {n} have?", f"{v[1]}."),
        "food": lambda: (f"What does {n} like to eat?", f"{_cap(v[0])}."),
        "locker": lambda: (f"What is {n}'s locker number?", f"{v}."),
    }[attr]()


def _first_person(p: Person, attr: str, ko: bool) -> str:
    """``p`` telling ``attr`` about themselves (``"name"`` too): "I live in Busan." / "나는 부산에 살아."."""
    v = p.facts.get(attr)
    if ko:
        return {
            "name": lambda: f"내 이름은 {_is_casual(p.name[1])}.",
            "city": lambda: f"나는 {v[1]}에 살아.",
            "job": lambda: f"나는 {_is_casual(v[1])}.",
            "age": lambda: f"나는 {v}살이야.",
            "colour": lambda: f"나는 {_object(v[1])} 좋아해.",
            "pets": lambda: f"나는 {v[0][2]} {v[1]}마리를 키워.",
            "food": lambda: f"나는 {_object(v[1])} 좋아해.",
            "locker": lambda: f"내 사물함 번호는 {v}번이야.",
        }[attr]()
    pets = (v[0][0] if v[1] == 1 else v[0][1]) if attr == "pets" else ""
    return {
        "name": lambda: f"My name is {p.name[0]}.",
        "city": lambda: f"I live in {v[0]}.",
        "job": lambda: f"I'm {_article(v[0])}.",
        "age": lambda: f"I'm {v} years old.",
        "colour": lambda: f"My favourite colour is {v[0]}.",
        "pets": lambda: f"I have {v[1]} {pets}.",
        "food": lambda: f"I like {v[0]}.",
        "locker": lambda: f"My locker number is {v}.",
    }[attr]()


def _self_question(p: Person, attr: str, ko: bool) -> tuple[str, str]:
    """The speaker asking about themselves, with the answer: "Where do I live?" "Busan."
    (the answer as ``_question`` gives it)."""
    if attr == "name":
        return ("내 이름이 뭐야?", f"{p.name[1]}.") if ko else ("What is my name?", f"{p.name[0]}.")
    v = p.facts[attr]
    if ko:
        question = {
            "city": lambda: "나는 어디에 살아?", "job": lambda: "나는 무슨 일을 해?", "age": lambda: "나는 몇 살이야?",
            "colour": lambda: "나는 무슨 색을 좋아해?", "pets": lambda: f"나는 {_object(v[0][2])} 몇 마리 키워?",
            "food": lambda: "나는 무슨 음식을 좋아해?", "locker": lambda: "내 사물함 번호는 뭐야?",
        }[attr]()
    else:
        question = {
            "city": lambda: "Where do I live?", "job": lambda: "What do I do?", "age": lambda: "How old am I?",
            "colour": lambda: "What is my favourite colour?", "pets": lambda: f"How many {v[0][1]} do I have?",
            "food": lambda: "What do I like to eat?", "locker": lambda: "What is my locker number?",
        }[attr]()
    return question, _question(p, attr, ko)[1]


def _exchange(asker: Person, p: Person, attr: str, ko: bool) -> list[str]:
    """Two dialogue turns: ``asker`` asks ``p`` about ``attr``, ``p`` answers in the first person."""
    v = p.facts[attr]
    if ko:
        a, n = asker.name[1], p.name[1]
        c = _call(n)
        ask = {
            "city": lambda: f"{c}, 어디에 살아?", "job": lambda: f"{c}, 무슨 일을 해?",
            "age": lambda: f"{c}, 몇 살이야?", "colour": lambda: f"{c}, 무슨 색을 좋아해?",
            "pets": lambda: f"{c}, {_object(v[0][2])} 몇 마리 키워?", "food": lambda: f"{c}, 무슨 음식을 좋아해?",
            "locker": lambda: f"{c}, 사물함 번호가 뭐야?",
        }[attr]()
    else:
        a, n = asker.name[0], p.name[0]
        ask = {
            "city": f"Where do you live, {n}?", "job": f"What do you do, {n}?", "age": f"How old are you, {n}?",
            "colour": f"What's your favourite colour, {n}?", "pets": f"Do you have any pets, {n}?",
            "food": f"What do you like to eat, {n}?", "locker": f"What's your locker number, {n}?",
        }[attr]
    return [f"{a}: {ask}", f"{n}: {_first_person(p, attr, ko)}"]


def _towards(w: str) -> str:  # 부산으로 / 서울로 / 파리로: a final ㄹ (8) takes 로, as no final does
    return w + ("으로" if has_final_consonant(w) and (ord(w[-1]) - 0xAC00) % 28 != 8 else "로")


def _city_statement(name: tuple[str, str], city: tuple[str, str], wording: str, ko: bool) -> str:
    """Where someone lives, in the wording ``lives`` / ``moved`` / ``correction``."""
    if ko:
        n, c = name[1], city[1]
        return {"lives": f"{_topic(n)} {c}에 산다.", "moved": f"{_topic(n)} {_towards(c)} 이사했다.",
                "correction": f"정정: {_topic(n)} {c}에 산다."}[wording]
    n, c = name[0], city[0]
    return {"lives": f"{n} lives in {c}.", "moved": f"{n} moved to {c}.",
            "correction": f"Correction: {n} lives in {c}."}[wording]


def _update(rng: random.Random, people: list[Person], korean: bool, parts: list[str],
            told: list[tuple[Person, str]]) -> tuple[Person, str]:
    """Tell one person's city twice, the later statement (any wording) being the true one."""
    p = rng.choice(people)
    used = {q.facts["city"] for q in people if "city" in q.facts}
    old, new = rng.sample([c for c in CITIES if c not in used], 2)
    if "city" in p.facts:
        old = p.facts["city"]
        at = next(i for i, (q, a) in enumerate(told) if q is p and a == "city")
    else:
        at = rng.randint(0, len(parts))
        parts.insert(at, "")
        told.insert(at, (p, "city"))
    parts[at] = _city_statement(p.name, old, rng.choice(["lives", "moved"]), korean)
    later = rng.randint(at + 1, len(parts))
    parts.insert(later, _city_statement(p.name, new, rng.choice(["moved", "correction", "lives"]), korean))
    p.facts["city"] = new
    return p, "city"


def make_world(rng: random.Random, korean: bool, kind: str | None = None, updates: float = 0.0,
               restate: float = 0.0, selves: float = 0.0, coined: float = 0.0) -> DemoWorld:
    """Draw one world from ``rng``: its people and facts, told as ``"facts"``, ``"dialogue"``
    or ``"self"`` (a share ``selves`` of worlds: a speaker tells their own name and facts in
    the first person, among statements about others, then asks about themselves: "My name
    is Aris. I live in Busan. ... Where do I live? Busan.").

    With ``updates`` > 0 that share of ``"facts"`` worlds tells one person's city twice (a
    move or a correction) and asks for it: the later statement wins. With ``restate`` > 0 that
    share of them also repeats one or two of its statements word for word on lines of their
    own among the questions (a told text read back in its own wording). With ``coined`` > 0
    that share of people has a made-up name (``coined_name``)."""
    if kind is None:
        kind = "self" if selves > 0 and rng.random() < selves else None
    if kind is None:
        kind = "facts" if rng.random() < 0.6 else "dialogue"
    people = _draw_people(rng, coined)
    told = [(p, a) for p in people for a in p.facts]
    rng.shuffle(told)
    updated = None
    if kind == "facts":
        parts = [_statement(p, a, korean) for p, a in told]
        if updates > 0 and rng.random() < updates:
            updated = _update(rng, people, korean, parts, told)
        body = " ".join(parts)
    elif kind == "dialogue":
        people = people[:2]  # two speakers
        told = [(p, a) for p, a in told if p in people]
        if korean:
            greeting = [f"{people[0].name[1]}: 안녕, 나는 {_is_casual(people[0].name[1])}.",
                        f"{people[1].name[1]}: 반가워, 나는 {_is_casual(people[1].name[1])}."]
        else:
            greeting = [f"{people[0].name[0]}: Hi, I'm {people[0].name[0]}.",
                        f"{people[1].name[0]}: Nice to meet you, I'm {people[1].name[0]}."]
        turns = list(greeting)
        for p, a in told:
            asker = people[1] if p is people[0] else people[0]
            turns.extend(_exchange(asker, p, a, korean))
        body = "\n".join(turns)
    elif kind == "self":
        me = people[0]
        told = [(me, "name")] + told
        rng.shuffle(told)
        body = " ".join(_first_person(p, a, korean) if p is me else _statement(p, a, korean) for p, a in told)
    else:
        raise ValueError(f"unknown world kind {kind!r}; use 'facts', 'dialogue' or 'self'")
    asked = rng.sample(told, min(len(told), rng.randint(2, 5)))
    if updated is not None and updated not in asked:
        asked[-1] = updated
    if kind == "self":  # mostly about the speaker
        others = [(p, a) for p, a in asked if p is not people[0]]
        asked = [(p, a) for p, a in told if p is people[0]][:rng.randint(2, 4)] + others[:rng.randint(0, 1)]
        rng.shuffle(asked)
    qa = [_self_question(p, a, korean) if kind == "self" and p is people[0] else _question(p, a, korean)
          for p, a in asked]
    lines = [f"{q} {a}" for q, a in qa]
    if kind == "facts" and restate > 0 and rng.random() < restate:
        current = [_statement(p, a, korean) for p, a in told if (p, a) != updated]  # as told, once
        for line in rng.sample(current, min(len(current), rng.randint(1, 2))):
            lines.insert(rng.randint(0, len(lines)), line)
    text = body + "\n" + "\n".join(lines)
    return DemoWorld(korean, kind, people, qa, text)


def demo_worlds(n: int, seed: int = 0, korean: float = 0.5, updates: float = 0.0,
                restate: float = 0.0, selves: float = 0.0, coined: float = 0.0) -> Iterator[DemoWorld]:
    """The first ``n`` worlds of ``seed``; a share ``korean`` of them in Korean."""
    for i in range(n):
        rng = random.Random(f"cortex-demo:{seed}:{i}")
        yield make_world(rng, rng.random() < korean, updates=updates, restate=restate, selves=selves,
                         coined=coined)


def demo_documents(n: int, seed: int = 0, korean: float = 0.5, updates: float = 0.0,
                   restate: float = 0.0, selves: float = 0.0, coined: float = 0.0) -> Iterator[Document]:
    """The demo corpus as [`Document`][cortex.kernel.interfaces.Document]s with origin ``demo:SEED:INDEX``."""
    for i, world in enumerate(demo_worlds(n, seed, korean, updates, restate, selves, coined)):
        yield Document(world.text, f"demo:{seed}:{i}")


#: (English, Korean) wordings of the codes of long documents; none is a benchmark's (no
#: "pass key", "bike code", "badge id", "room", "extension")
CODE_WORDINGS = (["{n}'s door code is {v}.", "{n}'s pin is {v}.", "{n}'s safe code is {v}.",
                  "The gate code of {n} is {v}.", "{n}'s ticket number is {v}."],
                 ["{n}의 현관 비밀번호는 {v}번이다.", "{n}의 금고 번호는 {v}번이다.", "{n}의 표 번호는 {v}번이다."])


#: heads of the key=value lists of long documents (not MQAR's "Remember:")
PAIR_HEADS = ("Tags", "Slots", "Table", "Map", "표", "목록")


def pair_list(rng: random.Random) -> list[tuple[str, str]]:
    """3 to 6 short keys — a letter and a digit, a digit and a letter, or three letters; never
    two letters, as MQAR's — with values of 2 or 3 digits."""
    def key() -> str:
        shape = rng.randrange(3)
        if shape == 2:
            return "".join(rng.sample(string.ascii_lowercase, 3))
        letter, digit = rng.choice(string.ascii_lowercase), rng.choice(string.digits)
        return letter + digit if shape == 0 else digit + letter
    return [(key(), str(rng.randint(10, 999))) for _ in range(rng.randint(3, 6))]


def long_demo_worlds(n: int, windows: int, context: int, count_tokens: Callable[[str], int], seed: int = 0,
                     korean: float = 0.5, restate: float = 0.0, recite: float = 0.0,
                     codes: int = 0, pairs: float = 0.0) -> Iterator[DemoWorld]:
    """The first ``n`` long worlds of ``seed``: a world's facts, then other worlds (about other
    people, with their own questions) filling at least ``windows`` context windows of
    ``context`` tokens (as ``count_tokens`` counts them), then the first world's questions.
    Each asked fact is stated ``windows`` windows or more before its question, so a model
    whose window ends at the question can answer only from memory; so can it the value of a
    statement restated word for word among them (``restate``), and of the share ``recite`` of
    its statements recited, in the order told, on a line after the filler; ``codes`` more
    statements tell codes of 3 to 7 digits (``CODE_WORDINGS``), which no pattern of the corpus
    predicts; a share ``pairs`` of the worlds also tells a list of short key=value pairs
    (``pair_list``) after its statements, recited after the filler in another order, so that a
    value is read by its key alone. ``qa`` and ``people`` are the first world's."""
    for i in range(n):
        rng = random.Random(f"cortex-demo-long:{seed}:{i}")
        ko = rng.random() < korean
        world = make_world(rng, ko, kind="facts", restate=restate)
        facts, questions = world.text.split("\n", 1)
        if codes:
            name = rng.choice(world.people).name[ko]
            facts += "".join(" " + rng.choice(CODE_WORDINGS[ko]).format(n=name, v=rng.randint(10 ** (k - 1), 10 ** k - 1))
                             for k in (rng.randint(3, 7) for _ in range(codes)))
        names = {p.name for p in world.people}
        filler: list[str] = []
        while count_tokens("\n".join(filler)) < windows * context:
            other = make_world(rng, ko)
            if not names & {p.name for p in other.people}:  # nobody asked about appears again
                filler.append(other.text)
        recited = [s.strip() for s in re.findall(r"[^.]+\.", facts) if rng.random() < recite] if recite else []
        listing = random.Random(f"cortex-demo-pairs:{seed}:{i}")  # its own draws: the rest stays as without
        if pairs and listing.random() < pairs:
            told = pair_list(listing)
            facts += f" {listing.choice(PAIR_HEADS)}: " + ", ".join(f"{k}={v}" for k, v in told) + "."
            again = listing.sample(told, len(told))
            recited.append(listing.choice([" ", ". ", ", ", "; "]).join(f"{k}={v}" for k, v in again) + ".")
        recital = [" ".join(recited)] if recited else []
        yield DemoWorld(ko, "facts", world.people, world.qa, "\n".join([facts, *filler, *recital, questions]))


class DemoSource(DataSource):
    """The synthetic bilingual facts-and-questions corpus (no files needed)."""

    name = "demo"

    class Settings(Settings):
        documents: int = Field(20000, gt=0, description="Number of documents.")
        seed: int = Field(0, description="Seed of the generator; the same seed gives the same corpus.")
        korean: float = Field(0.5, ge=0.0, le=1.0, description="Share of Korean documents.")
        updates: float = Field(0.0, ge=0.0, le=1.0, description="Share of fact documents that tell a "
                                                                "city twice (a move or a correction); "
                                                                "the later statement is the answer.")
        restate: float = Field(0.0, ge=0.0, le=1.0, description="Share of fact documents that repeat one "
                                                                "or two statements word for word on lines "
                                                                "among the questions.")
        selves: float = Field(0.0, ge=0.0, le=1.0, description="Share of documents in which a speaker "
                                                               "tells their own name and facts in the first "
                                                               "person and asks about themselves.")
        coined: float = Field(0.0, ge=0.0, le=1.0, description="Share of people with a made-up name "
                                                               "(two or three syllables, never a benchmark's), "
                                                               "which only copying can answer.")
        distance_windows: int = Field(0, ge=0, description="Long documents (0: off): each world's questions "
                                                            "come after other worlds filling this many of the "
                                                            "model's context windows; `korean`, `seed` and "
                                                            "`restate` apply.")
        recite: float = Field(0.0, ge=0.0, le=1.0, description="Long documents: share of a world's statements "
                                                               "recited word for word after the filler, before "
                                                               "its questions (memory alone predicts their values).")
        codes: int = Field(0, ge=0, le=8, description="Long documents: codes of 3 to 7 digits told among a world's "
                                                      "statements (recited with them), values no pattern predicts.")
        pairs: float = Field(0.0, ge=0.0, le=1.0, description="Long documents: share of worlds that also tell a list "
                                                              "of 3 to 6 short key=value pairs, recited after the "
                                                              "filler in another order (a value read by its key).")

    def documents(self) -> Iterator[Document]:
        s = self.settings
        if s.distance_windows:
            config, tokenizer = self.context.config, self.context.tokenizer
            if config is None or tokenizer is None:
                raise DataError("demo: distance_windows counts the model's context windows — use it in a "
                                "manifest's train.data, which knows the model")
            worlds = long_demo_worlds(s.documents, s.distance_windows, config.context,
                                      lambda text: len(tokenizer.encode(text)), s.seed, s.korean, s.restate,
                                      s.recite, s.codes, s.pairs)
            return (Document(w.text, f"demo-long:{s.seed}:{i}") for i, w in enumerate(worlds))
        return demo_documents(s.documents, s.seed, s.korean, s.updates, s.restate, s.selves, s.coined)


@hookimpl
def cortex_register_components(register):
    register(DemoSource)
