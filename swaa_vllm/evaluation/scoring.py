"""Scoring of the retrieval tasks of :mod:`swaa_vllm.evaluation.tasks`: exact match of the retrieved value.

The first number in the output for single-value tasks, every expected number present for
``niah_multivalue`` (RULER's all-match); for the fine-tuning families (:data:`TRAINING_TASKS`), the expected
word, code or city named first. Pure text processing: nothing here imports vLLM or a tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from swaa_vllm.evaluation.tasks import CITIES, COLORS, TASKS, TRAINING_TASKS

__all__ = ["extract_numbers", "score"]

# Numbers in text: digit runs, with thousands separators folded ("1,234,567" -> "1234567").
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")


def extract_numbers(text: str) -> list[str]:
    """All numbers in ``text`` in order of appearance, as digit strings (thousands commas removed)."""
    return [m.group(0).replace(",", "") for m in _NUMBER.finditer(text)]


def score(task: str, output: str, answers: Sequence[str]) -> bool:
    """Exact match of the retrieved value(s).

    Single-value tasks: the first number in ``output`` equals ``answers[0]`` (a number embedded in a
    sentence counts; a wrong number first, or none, does not). ``niah_multivalue``: every expected number
    appears among the numbers of ``output`` (order free; extra numbers allowed, as RULER's all-match).
    :data:`TRAINING_TASKS`: the expected word/code/city appears in ``output`` as a whole word
    (case-insensitive) and no other value of the same kind comes before it.

    Raises:
        ValueError: unknown ``task`` or empty ``answers``.
    """
    if task not in TASKS + TRAINING_TASKS:
        raise ValueError(f"unknown task {task!r}")
    if not answers:
        raise ValueError("answers must not be empty")
    if task in TRAINING_TASKS:
        return _first_value(task, output) == answers[0].lower()
    found = extract_numbers(output)
    if task == "niah_multivalue":
        return set(answers) <= set(found)
    return bool(found) and found[0] == answers[0]


_VALUE_PATTERNS = {
    "word_lookup": re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE),
    "code_lookup": re.compile(r"\b[A-Z]{2}-\d{1,4}\b", re.IGNORECASE),
    "person_city": re.compile(r"\b(" + "|".join(CITIES) + r")\b", re.IGNORECASE),
}


def _first_value(task: str, output: str) -> str | None:
    """The first color / code / city named in ``output`` (lower case), or None."""
    match = _VALUE_PATTERNS[task].search(output)
    return match.group(0).lower() if match else None
