"""A scripted LLM and a keyword teacher for the GenerateCounterfactuals tests, whose every answer is known in advance.

The LLM reads the request's own user turn (label, count, shown seeds, seed text, target label; for a label judgment the
numbered labels and the text) and answers for the bike-share task in tests/data/counterfactuals/, mixing good texts
with each kind of noise the stage must reject. Build it with
`LLMSpec(backend="custom", model="tests.fakes.classification_llm:factory")`.

The teacher (`EmbedderSpec(backend="custom", model="tests.fakes.classification_llm:teacher")`) is a KeywordEmbedder
whose vocabulary is the words that decide a label in this task (`LABEL_WORDS`): a text is near the label whose words
it holds. The LLM judge counts the same words, so both judges' verdicts can be read off the texts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic import BaseModel

from pipelines.clients.base import ChatMessage
from tests.fakes.backends import KeywordEmbedder, ScriptedLLM

#: Shared by two labels' answers: the stage must reject both copies as `conflicting_labels`.
AMBIGUOUS = "The app crashed when I tried to end my ride."
#: What the counterfactual prompt's own demonstration answers: echoing it is `copies_example`.
DEMONSTRATION = "The battery barely lasts half a day and the screen is dim even indoors."
SHOWN_SEED = "<the first seed the prompt showed>"
#: Written for "payment" but about a broken bike: the label judge rejects it as `label_mismatch`.
WRONG_LABEL_EXAMPLE = "The front tyre is flat and the brakes are broken."
#: A counterfactual that changed a word but not the meaning: still a payment message, so `label_mismatch`.
SAME_MEANING_EDIT = "My card was declined when I tried to buy a week pass."

#: Label -> the answer's examples (the tests ask for 4 per label). "docking" answers with truncated JSON.
GENERATED = {
    # kept, conflicting_labels, copies_example, label_mismatch, surplus (a 5th text when 4 were asked for)
    "payment": ["Can I pay for a monthly pass with PayPal?", AMBIGUOUS, SHOWN_SEED, WRONG_LABEL_EXAMPLE,
                "Do students get a discount on the yearly pass?"],
    # kept, duplicate (of the first, within the answer), conflicting_labels, duplicate (of a docking seed)
    "broken_bike": ["The bell on bike 2210 is missing.", "the bell on bike 2210 is missing!", AMBIGUOUS,
                    "Every dock at Central Station is full, where can I return my bike?"],
}
TRUNCATED = '{"examples": ["The dock at the market has been out of service since'

#: Seed text -> scripted counterfactual (anything else gets a minimal edit toward the target label).
COUNTERFACTUALS = {
    "How do I get a refund for my annual pass?": "How do I get a refund for my annual pass?",  # unchanged
    "The saddle on my bike is loose and will not stay up.": "Please open more stations in the north of the city.",
    "I cannot undock a bike at the library station, the light stays red.": DEMONSTRATION,
    "The chain keeps slipping off on the bike from the station by the park.": "not JSON at all",
    # A seed of another label: duplicate.
    "I was charged twice for the same ride on Tuesday.": "The bike I took at Elm Street has a flat front tyre.",
    "My card was declined when I tried to buy a day pass.": SAME_MEANING_EDIT,
}
#: The minimal edit: the last two words give way to a phrase of the target label. Six seeds get one; five of those
#: now read as their target label, and one ("Every dock at Central Station is full, where can I return ...") keeps
#: "dock" and "full": the teacher still reads it as docking (`label_mismatch`), the LLM judge sees a tie (2 payment
#: words, 2 docking words) and, as scripted below, takes the first label listed, its target "payment".
ENDINGS = {"payment": "and I was charged twice, please refund me.",
           "broken_bike": "and the brakes are broken, the tyre is flat.",
           "docking": "and no dock is free, every dock is full."}
#: The words that decide each label: the teacher's vocabulary and the LLM judge's evidence.
LABEL_WORDS = {
    "payment": ("charges", "charged", "refunds", "refund", "passes", "pass", "payment", "card", "declined", "cost",
                "fee", "paypal"),
    "broken_bike": ("damaged", "unsafe", "brakes", "flat", "tyre", "chain", "saddle", "broken", "bell"),
    "docking": ("dock", "docks", "docked", "undock", "undocked", "free", "full"),
}


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"the scripted LLM found no {pattern!r} in the prompt:\n{text}")
    return match.group(1)


def judge_label(user: str) -> int:
    """The scripted label judgment: the listed label whose words the text holds most often; ties go to the first."""
    labels = re.findall(r"^(\d+)\. ([^:]+):", user, re.MULTILINE)
    words = re.findall(r"[a-z0-9]+", _field(r"<text>\n([^<]*)\n</text>", user).lower())
    hits = [(sum(words.count(word) for word in LABEL_WORDS[name]), -int(number)) for number, name in labels]
    return -max(hits)[1]


def respond(messages: Sequence[ChatMessage], output_model: type[BaseModel]) -> str:
    user = messages[-1].content
    if output_model.__name__.startswith("LabelChoice"):
        return json.dumps({"label": judge_label(user)})
    if output_model.__name__ == "GeneratedExamples":
        label = _field(r"^Label: (.+)$", user)
        if label not in GENERATED:
            return TRUNCATED
        shown = re.findall(r"<item>(.*?)</item>", user, re.DOTALL)
        examples = [shown[0] if text == SHOWN_SEED else text for text in GENERATED[label]]
        return json.dumps({"examples": examples})
    text = _field(r"<text>\n([^<]*)\n</text>", user)
    target = _field(r'belongs to the target label "(.+?)"', user)
    if text in COUNTERFACTUALS:
        answer = COUNTERFACTUALS[text]
        return answer if answer == "not JSON at all" else json.dumps({"text": answer})
    return json.dumps({"text": " ".join(text.split()[:-2] + [ENDINGS[target]])})


def factory() -> ScriptedLLM:
    return ScriptedLLM(respond)


def teacher() -> KeywordEmbedder:
    return KeywordEmbedder(vocabulary=[word for words in LABEL_WORDS.values() for word in words], dimension=64)
