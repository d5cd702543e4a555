"""Wordings and names of ``cortex bench facts`` that no training data source uses.

The facts suite teaches and asks with these so that a figure measures what the model does
with told text, not whether it has learnt the wording: the built-in corpus (the ``demo``
data source) never says "bike code", "badge id", "room ... number", "extension" or their
Korean counterparts, and never names these people (``tests/test_bench_facts.py`` checks
both against the demo generator). The demo's own locker template is measured beside them
as its own row.

Each wording is ``(statement, question)``: ``{n}`` a name, ``{v}`` a four-digit value. The
statement up to the value is the cue the suite asks with; the question is the paraphrase.
"""

from __future__ import annotations

from cortex_plugins.data.demo import UNSEEN_NAMES

WORDINGS = {
    "en": [
        ("{n}'s bike code is {v}.", "Which code opens {n}'s bike lock?"),
        ("{n}'s room is number {v}.", "In which room does {n} stay?"),
        ("{n}'s badge id is {v}.", "Tell me {n}'s badge id."),
        ("{n} can be reached on extension {v}.", "Which extension reaches {n}?"),
    ],
    "ko": [
        ("{n}의 자전거 비밀번호는 {v}번이다.", "{n}의 자전거 자물쇠는 어떤 번호로 열려?"),
        ("{n}의 방은 {v}호실이다.", "{n}의 숙소는 몇 호실이야?"),
        ("{n}의 출입증 번호는 {v}번이다.", "{n}의 출입증에 적힌 번호를 알려 줘."),
        ("{n}에게는 내선 {v}번으로 연락하면 된다.", "내선 몇 번으로 걸어야 {n}에게 연결돼?"),
    ],
}

#: (English, Korean) names the demo corpus never uses: those of ``cortex bench reads`` and more
NAMES = UNSEEN_NAMES

#: unrelated sentences asked before every cue, per language
DISTRACTORS = {
    "en": [
        "We talked about the weather and the bus schedule for a while.",
        "The cafeteria served noodles today and the line was long.",
        "Somebody left an umbrella by the door of the library.",
        "The meeting moved to the afternoon because of the rain.",
    ],
    "ko": [
        "우리는 한동안 날씨와 버스 시간표에 대해 이야기했다.",
        "오늘 식당에서는 국수가 나왔고 줄이 길었다.",
        "누군가 도서관 문 옆에 우산을 두고 갔다.",
        "비 때문에 회의가 오후로 미뤄졌다.",
    ],
}
