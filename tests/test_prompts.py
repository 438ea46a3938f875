"""The shared prompt template and the per-dataset answer extraction (LLM-Adapters' rules)."""

import re

import pytest

from denselora_jax.prompts import ANSWER_CHOICES, DATASETS, extract_answer, generate_prompt

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Say hi.\n"
    "\n"
    "### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Translate.\n"
    "\n"
    "### Input:\n"
    "bonjour\n"
    "\n"
    "### Response:\n"
)

# One record per dataset in the LLM-Adapters format (instruction as in its test.json files).
RECORDS = {
    "boolq": (
        "Please answer the following question with true or false, question: is 7 greater than 3?\n\n"
        "Answer format: true/false",
        "false",
    ),
    "piqa": (
        "Please choose the correct solution to the question: To dry a wet towel, you should\n\n"
        "Solution1: hang it in the sun.\n\nSolution2: put it in a bucket of water.\n\n"
        "Answer format: solution1/solution2",
        "solution2",
    ),
    "social_i_qa": (
        "Please choose the correct answer to the question: Kai had 5 apples and gave 2 to Remy. How many "
        "apples does Kai have now?\n\nAnswer1: 3\n\nAnswer2: 7\n\nAnswer3: 2\n\n"
        "Answer format: answer1/answer2/answer3",
        "answer3",
    ),
    "hellaswag": (
        "Please choose the correct ending to complete the given sentence: Counting: She counts 1, 2, 3, and "
        "then says\n\nEnding1: 4.\n\nEnding2: 9.\n\nEnding3: 2.\n\nEnding4: 7.\n\n"
        "Answer format: ending1/ending2/ending3/ending4",
        "ending4",
    ),
    "winogrande": (
        "Please choose the correct answer to fill in the blank to complete the given sentence: Ann is 9 and "
        "Bo is 5, so _ is older.\n\nOption1: Ann\n\nOption2: Bo\n\nAnswer format: option1/option2",
        "option2",
    ),
    "ARC-Easy": (
        "Please choose the correct answer to the question: What is 2 plus 2?\n\nAnswer1: 3\n\nAnswer2: 4\n\n"
        "Answer3: 5\n\nAnswer4: 22\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer4",
    ),
    "ARC-Challenge": (
        "Please choose the correct answer to the question: What is 2 times 3 plus 1?\n\nAnswer1: 7\n\n"
        "Answer2: 8\n\nAnswer3: 6\n\nAnswer4: 9\n\nAnswer5: 5\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
        "answer5",
    ),
    "openbookqa": (
        "Please choose the correct answer to the question: The day after Monday is\n\nAnswer1: Tuesday\n\n"
        "Answer2: Sunday\n\nAnswer3: Friday\n\nAnswer4: Monday\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer2",
    ),
}


def reference_extract(dataset: str, decoded: str) -> str:
    """LLM-Adapters' commonsense_evaluate.py: text after "### Response:", lower-cased, first re.findall hit."""
    sentence = decoded.split("### Response:")[1].strip().lower()
    pattern = {
        "boolq": r"true|false",
        "piqa": r"solution1|solution2",
        "hellaswag": r"ending1|ending2|ending3|ending4",
        "winogrande": r"option1|option2",
    }.get(dataset, r"answer1|answer2|answer3|answer4|answer5")
    found = re.findall(pattern, sentence)
    return found[0] if found else ""


def test_template_exact_text():
    assert generate_prompt("Say hi.") == NO_INPUT
    assert generate_prompt("Say hi.", "") == NO_INPUT  # LLM-Adapters' data has input "" everywhere
    assert generate_prompt("Say hi.", None, "hi") == NO_INPUT + "hi"
    assert generate_prompt("Translate.", "bonjour") == WITH_INPUT
    assert generate_prompt("Translate.", "bonjour", "hello") == WITH_INPUT + "hello"
    # The evaluation prompt is exactly the training text up to the output.
    full = generate_prompt("Say hi.", "", "the correct answer is true")
    assert full.startswith(generate_prompt("Say hi.")) and "\n " not in full


def test_datasets_order_and_choices():
    assert DATASETS == (
        "boolq",
        "piqa",
        "social_i_qa",
        "hellaswag",
        "winogrande",
        "ARC-Easy",
        "ARC-Challenge",
        "openbookqa",
    )
    assert set(ANSWER_CHOICES) == set(DATASETS)
    assert ANSWER_CHOICES["hellaswag"] == ("ending1", "ending2", "ending3", "ending4")
    assert ANSWER_CHOICES["openbookqa"][-1] == "answer5"


@pytest.mark.parametrize("dataset", DATASETS)
def test_extract_from_decoded_record(dataset):
    """The instruction lists every choice ("Answer format: ..."); only the response may be read."""
    instruction, answer = RECORDS[dataset]
    decoded = generate_prompt(instruction) + f"the correct answer is {answer}"
    assert extract_answer(dataset, decoded) == answer == reference_extract(dataset, decoded)
    # The generated continuation alone (no marker) is read whole.
    assert extract_answer(dataset, f" the correct answer is {answer}</s>") == answer


@pytest.mark.parametrize("dataset", DATASETS)
def test_extract_no_match_first_match_and_case(dataset):
    instruction, answer = RECORDS[dataset]
    prompt = generate_prompt(instruction)
    choices = ANSWER_CHOICES[dataset]
    other = next(c for c in choices if c != answer)
    assert extract_answer(dataset, prompt + "I do not know.") is None
    assert reference_extract(dataset, prompt + "I do not know.") == ""
    # Several matches: the first one wins, wherever the phrase is.
    text = prompt + f"{other}, no wait, the correct answer is {answer}"
    assert extract_answer(dataset, text) == other == reference_extract(dataset, text)
    # Case-insensitive, reported lower-case.
    upper = prompt + f"The Correct Answer Is {answer.upper()}."
    assert extract_answer(dataset, upper) == answer == reference_extract(dataset, upper)
    # Without word boundaries, as the reference: "answer1." or "(ending2)" still match.
    assert extract_answer(dataset, prompt + f"({answer})") == answer


def test_extract_other_formats_do_not_match_and_second_response_ignored():
    prompt = generate_prompt(RECORDS["piqa"][0])
    assert extract_answer("piqa", prompt + "the correct answer is answer1 / option2 / ending3") is None
    assert extract_answer("winogrande", prompt + "the correct answer is option2") == "option2"
    # Text after a second "### Response:" is not read (LLM-Adapters keeps split(...)[1]).
    text = prompt + "none\n\n### Response:\nsolution1"
    assert extract_answer("piqa", text) is None and reference_extract("piqa", text) == ""


def test_extract_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match=r"unknown dataset 'arc_easy'.*ARC-Easy"):
        extract_answer("arc_easy", "answer1")
