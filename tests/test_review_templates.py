"""Security review: bounds of the template sandbox that a tenant admin (or a sender, through the
preview) could otherwise pass."""

from __future__ import annotations

import pytest

from mailgate.notifications import engine
from mailgate.notifications.engine import TemplateError


def _joins(start: str, n: int) -> str:
    return "{{ " + start + '|join("..........")' * n + "|length }}"


def test_chained_joins_of_a_constant_are_refused_not_folded_into_gigabytes() -> None:
    # Each join puts 10 characters between every character: ×11 a step. 6 steps of a 10-character
    # constant are 16 M characters (8 would be 1.9 G), made by the compile-time constant folding
    # though the output (its |length) is 8 characters.
    source = _joins('"aaaaaaaaaa"', 6)
    assert engine.check("text", source, {}) == []
    with pytest.raises(TemplateError) as e:
        engine.Compiled("text", source).render({})
    assert "longer than" in e.value.problems[0][1]


def test_chained_joins_of_a_variable_are_stopped_at_render() -> None:
    source = _joins("name", 3)  # 4,000 → 44 K → 484 K → 5.3 M characters
    declared = {"name": None}
    assert engine.check("text", source, declared) == []
    with pytest.raises(TemplateError):
        engine.Compiled("text", source).render({"name": "x" * engine.MAX_STRING})


def test_filters_still_work_within_the_bound() -> None:
    source = '{{ name|join("-")|upper }} {{ items|join(", ") }} {{ name|default("x")|length }}'
    out = engine.Compiled("text", source).render({"name": "ab", "items": ["a", "b"]})
    assert out == "A-B a, b 2"
