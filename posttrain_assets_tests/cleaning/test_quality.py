"""Tests for the quality gate (``posttrain_assets.cleaning.quality``): every filter's reason, languages, licenses."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from posttrain_assets.cleaning import quality
from posttrain_assets.cleaning.quality import Drop, QualityConfig, apply_quality_gate, detect_language
from posttrain_assets.records.formats import get_adapter
from posttrain_assets_tests.real_data import REAL_DATA

EN_Q = "How do plants turn sunlight into chemical energy?"
EN_A = "Plants use chlorophyll to capture light and convert carbon dioxide and water into glucose and oxygen."


def sft(rid: str, messages: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
    return {"id": rid, "source": "s", "regime": "sft", "messages": messages, "license": "MIT", **kw}


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def pref(rid: str, chosen: str, rejected: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "source": "p",
        "regime": "preference",
        "messages": turns(("user", EN_Q)),
        "prompt": EN_Q,
        "chosen": chosen,
        "rejected": rejected,
        "license": "MIT",
        **kw,
    }


GOOD = sft("good", turns(("system", "Be brief."), ("user", EN_Q), ("assistant", EN_A)))

CASES = [
    (sft("e1", turns(("user", EN_Q), ("assistant", "  \n"))), "empty_turn", "messages[1] (assistant) is empty"),
    (pref("e2", EN_A, " "), "empty_turn", "rejected is empty"),
    (
        {
            "id": "e3",
            "source": "r",
            "regime": "rl",
            "messages": turns(("user", EN_Q)),
            "prompt": EN_Q,
            "answer": "",
            "license": "MIT",
        },
        "empty_turn",
        "answer is empty",
    ),
    (
        sft("r1", turns(("user", EN_Q), ("user", EN_Q), ("assistant", EN_A))),
        "roles_not_alternating",
        "messages[1] is user, expected assistant after user",
    ),
    (
        sft("r2", turns(("assistant", EN_A), ("user", EN_Q), ("assistant", EN_A))),
        "roles_not_alternating",
        "messages[0] is assistant, expected user first",
    ),
    (
        sft("r3", turns(("user", EN_Q), ("system", "x"), ("assistant", EN_A))),
        "roles_not_alternating",
        "messages[1] is system, expected assistant after user",
    ),
    (
        sft("n1", turns(("user", EN_Q), ("assistant", EN_A), ("user", EN_Q))),
        "sft_not_ending_with_assistant",
        "the last turn is user",
    ),
    (
        pref("t1", "Glucose, mostly.", "glucose,   MOSTLY."),
        "tie_pair",
        "chosen and rejected are equal after normalisation",
    ),
    (
        sft("b1", turns(("user", EN_Q), ("assistant", "As an AI language model, I do not have opinions."))),
        "refusal_boilerplate",
        "messages[1] matches '\\\\bas an ai(?: language)? model\\\\b'",
    ),
    (
        sft("l1", turns(("user", EN_Q), ("assistant", EN_A)), license=None),
        "missing_license",
        "the row has no license id",
    ),
    (
        sft(
            "f1",
            turns(
                ("user", "Comment les plantes transforment-elles la lumière du soleil en énergie ?"),
                ("assistant", "Les plantes utilisent la chlorophylle pour capter la lumière."),
            ),
        ),
        "language_not_allowed",
        "detected fr (0.95), allowed: en",
    ),
]


@pytest.mark.parametrize(("row", "reason", "detail"), CASES, ids=[c[0]["id"] for c in CASES])
def test_each_filter_drops_with_its_reason(row: dict[str, Any], reason: str, detail: str) -> None:
    kept, dropped = apply_quality_gate([GOOD, row])
    assert [r["id"] for r in kept] == ["good"]
    assert kept[0]["lang"] == "en"
    assert dropped == [{"id": row["id"], "source": row["source"], "reason": reason, "detail": detail}]
    assert reason in quality.QUALITY_REASONS


def test_roles_allow_tools_after_assistant() -> None:
    row = sft(
        "tool",
        turns(
            ("user", EN_Q),
            ("assistant", "Let me look it up."),
            ("tool", '{"ok": true}'),
            ("tool", "{}"),
            ("assistant", EN_A),
            ("user", "Thanks, and why green?"),
            ("assistant", "Chlorophyll reflects green light."),
        ),
    )
    assert quality.roles_not_alternating(row, QualityConfig()) is None
    bad = sft("tool2", turns(("user", EN_Q), ("tool", "{}"), ("assistant", EN_A)))
    assert quality.roles_not_alternating(bad, QualityConfig()) == Drop(
        "roles_not_alternating", "messages[1] is tool, expected assistant after user"
    )


def test_tie_pair_drops_only_identical_pairs() -> None:
    # equal up to case, whitespace and Unicode form: no signal, dropped
    drop = Drop("tie_pair", "chosen and rejected are equal after normalisation")
    assert quality.tie_pair(pref("t", "Ｇlucose, mostly.", "glucose,\u00a0 MOSTLY."), QualityConfig()) == drop
    # end punctuation counts here (real HH-RLHF row 74); the preference stage flags this pair is_tie instead
    assert quality.tie_pair(pref("t", "You\u2019re welcome.", "You\u2019re welcome!"), QualityConfig()) is None
    # near-identical is not identical: kept
    reply = "Plants turn light, water and carbon dioxide into sugar and oxygen. " * 5
    assert quality.tie_pair(pref("t", reply, reply + "Mostly."), QualityConfig()) is None


@pytest.mark.parametrize(
    "text",
    [
        "I cannot fulfill that request.",
        "I'm sorry, but I can't help with making explosives.",
        "I am sorry but I cannot do that.",
        "It is important to note that every case differs, so please consult a professional before acting.",
        "As a large language model I have no feelings.",
    ],
)
def test_refusal_patterns(text: str) -> None:
    assert QualityConfig().refusal_match(text) is not None


def test_refusal_patterns_leave_ordinary_answers() -> None:
    cfg = QualityConfig()
    assert cfg.refusal_match(EN_A) is None
    assert cfg.refusal_match("It is important to note that the oven must be preheated.") is None
    assert cfg.refusal_match("Sorry for the delay, here is the fixed code.") is None


def test_refusal_in_preference_chosen_is_off_by_default() -> None:
    refusal = "I'm sorry, but I can't help with that. Hurting someone is never okay."
    chosen_refusal = pref("p1", refusal, "Sure, here is how to hurt them.")
    rejected_refusal = pref("p2", EN_A, refusal)
    kept, dropped = apply_quality_gate([chosen_refusal, rejected_refusal])
    assert ([r["id"] for r in kept], dropped) == (["p1", "p2"], [])
    kept, dropped = apply_quality_gate(
        [chosen_refusal, rejected_refusal], QualityConfig(refusal_in_preference_chosen=True)
    )
    assert [r["id"] for r in kept] == ["p2"]  # a refusal as rejected is fine
    assert [(d["id"], d["reason"]) for d in dropped] == [("p1", "refusal_boilerplate")]
    kept, _ = apply_quality_gate([GOOD, CASES[8][0]], QualityConfig(refusal_in_sft=False))
    assert len(kept) == 2


def test_first_failing_filter_wins() -> None:
    row = sft("x", turns(("user", EN_Q), ("user", "  ")), license="CC-BY-NC-4.0")
    cfg = QualityConfig(license_policy="commercial")
    _, dropped = apply_quality_gate([row], cfg)
    assert [d["reason"] for d in dropped] == ["license_not_allowed"]
    _, dropped = apply_quality_gate([row])
    assert [d["reason"] for d in dropped] == ["empty_turn"]


def test_language_detection() -> None:
    texts = [
        "The weather is lovely today, so we are going for a walk in the park.",
        "Il fait très beau aujourd'hui, alors nous allons nous promener dans le parc.",
        "Heute ist das Wetter schön, deshalb gehen wir im Park spazieren.",
        "今天天气很好，我们去公园散步吧。",
        "12 + 7 = 19",
    ]
    got = detect_language(texts)
    assert [lang for lang, _ in got] == ["en", "fr", "de", "zh", "und"]
    assert all(p >= 0.8 for _, p in got[:4]) and got[4] == ("und", 0.0)
    assert detect_language(texts) == got  # deterministic


def test_language_gate_settings() -> None:
    zh = sft("zh", turns(("user", "请解释一下光合作用。"), ("assistant", "植物利用阳光把二氧化碳和水变成葡萄糖。")))
    assert [d["reason"] for d in apply_quality_gate([zh])[1]] == ["language_not_allowed"]
    kept, dropped = apply_quality_gate([zh], QualityConfig(allowed_languages=frozenset({"en", "zh"})))
    assert (kept[0]["lang"], dropped) == ("zh", [])
    kept, _ = apply_quality_gate([zh], QualityConfig(allowed_languages=None))
    assert kept[0]["lang"] == "zh"


# Measured on the real HH-RLHF harmless test pairs: 4 transcripts have two assistant turns in a row.
DROPS_HH = {"roles_not_alternating": 4}
HH_REFUSAL_CHOSEN = 2  # more drops when refusal_in_preference_chosen=True


def test_real_hh_rlhf_quality_gate() -> None:
    """The real HH-RLHF pairs: drops per reason, languages of the kept rows, the chosen-refusal setting."""
    adapter = get_adapter("hh_rlhf")
    rows = []
    with gzip.open(REAL_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            try:
                rec = adapter.parse(json.loads(line), "preference")
            except ValueError:
                continue
            rows.append(
                {
                    "id": f"hh-{i}",
                    "source": "hh",
                    "regime": "preference",
                    "messages": rec.messages,
                    "prompt": rec.prompt,
                    "chosen": rec.chosen,
                    "rejected": rec.rejected,
                    "license": "MIT",
                }
            )
    assert len(rows) == 2303
    kept, dropped = apply_quality_gate(rows)
    assert {d["reason"] for d in dropped} == set(DROPS_HH) and len(dropped) == sum(DROPS_HH.values())
    # 7 undetermined: 4 below the confidence cut-off, 3 with fewer than 20 letters
    assert {r["lang"] for r in kept} == {"en", "und"} and sum(r["lang"] == "und" for r in kept) == 7
    _, strict_dropped = apply_quality_gate(rows, QualityConfig(refusal_in_preference_chosen=True))
    assert len(strict_dropped) - len(dropped) == HH_REFUSAL_CHOSEN


def test_license_policy_on_alpaca() -> None:
    raw = json.loads((REAL_DATA / "alpaca" / "alpaca_data_cleaned_1000.json").read_text(encoding="utf-8"))[:20]
    rows = []
    for i, row in enumerate(raw):
        rec = get_adapter("alpaca").parse(row, "sft")
        rows.append(
            {"id": f"a{i}", "source": "alpaca", "regime": "sft", "messages": rec.messages, "license": "CC-BY-NC-4.0"}
        )
    _, dropped = apply_quality_gate(rows, QualityConfig(license_policy="commercial", allowed_languages=None))
    assert len(dropped) == 20
    assert dropped[0] == {
        "id": "a0",
        "source": "alpaca",
        "reason": "license_not_allowed",
        "detail": "license 'CC-BY-NC-4.0' is non-commercial",
    }
    kept, dropped = apply_quality_gate(rows, QualityConfig(license_policy="any", allowed_languages=None))
    assert (len(kept), dropped) == (20, [])


@pytest.mark.parametrize(
    ("lic", "ok"),
    [
        ("MIT", True),
        ("apache-2.0", True),
        ("CC-BY-SA-4.0", True),
        ("CC0-1.0", True),
        ("CC-BY-NC-SA-4.0", False),
        ("Llama-2-research-only", False),
        ("proprietary-x", False),
        ("Non-Commercial", False),
    ],
)
def test_commercial_license_list(lic: str, ok: bool) -> None:
    drop = quality.license_not_allowed({"license": lic}, QualityConfig(license_policy="commercial"))
    assert (drop is None) == ok


def test_refusal_alternation_shortcut_names_the_first_pattern() -> None:
    cfg = QualityConfig()
    assert cfg._any_refusal is not None
    text = "I'm sorry, but I can't do that. As an AI language model I have no opinions."
    assert cfg.refusal_match(text) == quality.DEFAULT_REFUSAL_PATTERNS[0]  # first in pattern order, not in text
    assert cfg.refusal_match(EN_A) is None
    # capture groups (numbered back-references would shift) or inline global flags: no shortcut, same answers
    grouped = QualityConfig(refusal_patterns=(r"(\w+) \1 again", r"\bnope\b"))
    assert grouped._any_refusal is None
    assert grouped.refusal_match("it is the the again") == r"(\w+) \1 again"
    assert grouped.refusal_match("Nope.") == r"\bnope\b"
    flagged = QualityConfig(refusal_patterns=(r"(?x) no \s pe", r"(?s)a.b"))
    assert flagged._any_refusal is None and flagged.refusal_match("a\nb") == r"(?s)a.b"


def test_language_detection_only_where_used(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = quality.detect_language

    def counting(texts: list[str], max_chars: int = 2000) -> list[tuple[str, float]]:
        seen.append(len(texts))
        return real(texts, max_chars)

    monkeypatch.setattr(quality, "detect_language", counting)
    rows = [GOOD, {**GOOD, "id": "tagged", "lang": "en"}]
    kept, _ = apply_quality_gate(rows, QualityConfig(allowed_languages=None))
    assert [r["lang"] for r in kept] == ["en", "en"] and seen == [1]  # "tagged" keeps its lang, not detected
    apply_quality_gate(rows)
    assert seen == [1, 2]  # an allowed set: every survivor is checked
    # repeated texts in one batch give the same answer as alone
    assert real([EN_A, EN_Q, EN_A]) == [real([EN_A])[0], real([EN_Q])[0], real([EN_A])[0]]
