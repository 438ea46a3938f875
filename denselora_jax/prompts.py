"""The prompt template shared by training and evaluation, and the per-dataset answer extraction.

Both follow LLM-Adapters (the paper's training and evaluation code): the Alpaca template, without the stray
indentation of the reference strings, and `extract_answer` = the first match of a per-dataset pattern in
the text after "### Response:" (no match is a wrong answer).
"""

from __future__ import annotations

import re
import types

RESPONSE_MARKER = "### Response:"

_HEADER_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def generate_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """The Alpaca prompt; with `output=None` it ends right after "### Response:\\n" (what a model completes).

    An empty or missing `input` selects the no-input form, as in LLM-Adapters (its commonsense data has
    `input` "" everywhere).
    """
    if input:
        head = f"{_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    else:
        head = f"{_HEADER_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n"
    return f"{head}{RESPONSE_MARKER}\n{output or ''}"


# The eight commonsense datasets in the paper's order, with the alternatives of their answer patterns.
DATASETS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
)
_ANSWERS5 = ("answer1", "answer2", "answer3", "answer4", "answer5")
ANSWER_CHOICES: types.MappingProxyType[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "boolq": ("true", "false"),
        "piqa": ("solution1", "solution2"),
        "social_i_qa": _ANSWERS5,
        "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
        "winogrande": ("option1", "option2"),
        "ARC-Easy": _ANSWERS5,
        "ARC-Challenge": _ANSWERS5,
        "openbookqa": _ANSWERS5,
    }
)
# Plain alternation without word boundaries, as LLM-Adapters (so "answer1." and "(answer1)" both match).
_PATTERNS = {name: re.compile("|".join(map(re.escape, choices))) for name, choices in ANSWER_CHOICES.items()}


def response_text(text: str) -> str:
    """The part of a decoded sequence the answer is read from: after the first "### Response:" (up to a
    second one, should the model write another), or the whole text when it has no marker."""
    parts = text.split(RESPONSE_MARKER)
    return parts[1] if len(parts) > 1 else text


def extract_answer(dataset_name: str, text: str) -> str | None:
    """The first match (lower case) of the dataset's answer pattern in the response, or None.

    Matching is case-insensitive: the response is lower-cased first, as some LLM-Adapters versions do, so
    "The correct answer is True" reads as "true".
    """
    pattern = _PATTERNS.get(dataset_name)
    if pattern is None:
        raise ValueError(
            f"extract_answer: unknown dataset {dataset_name!r}; known datasets: {', '.join(DATASETS)} "
            "(exact names, as the LLM-Adapters dataset folders)."
        )
    match = pattern.search(response_text(text).lower())
    return match.group(0) if match else None
