"""Generate the bundled demo dataset (denselora_jax/demo_data/) from verifiable templates.

Records follow LLM-Adapters' commonsense data exactly (`instruction`, `input` "", `output` "the correct
answer is X", `answer` X), phrased like the eight benchmarks with their answer formats; the facts are
small arithmetic, comparisons, ordering, counting, units and calendar facts, so every answer is computed,
not looked up. Answer positions are balanced, train and test instructions are disjoint, and the output is
a pure function of --seed.

    python scripts/make_demo_data.py [--out denselora_jax/demo_data] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from collections.abc import Callable

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
NUM_CHOICES = {"boolq": 2, "piqa": 2, "social_i_qa": 3, "hellaswag": 4, "winogrande": 2}  # others: 4

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NAMES = ("Alex", "Bailey", "Carson", "Dana", "Emma", "Felix", "Grace", "Henry", "Ivy", "Jordan", "Kai",
         "Lena", "Mason", "Nora", "Omar", "Priya", "Quinn", "Riley", "Sasha", "Tom", "Uma", "Victor",
         "Wendy", "Yusuf", "Zoe")  # fmt: skip
ITEMS = ("apples", "pencils", "marbles", "cookies", "stickers", "books", "cards", "coins", "shells", "eggs")
# (larger unit, smaller unit, how many smaller in one larger)
UNITS = (("meter", "centimeters", 100), ("kilometer", "meters", 1000), ("hour", "minutes", 60),
         ("minute", "seconds", 60), ("day", "hours", 24), ("week", "days", 7), ("year", "months", 12),
         ("kilogram", "grams", 1000), ("dollar", "cents", 100), ("liter", "milliliters", 1000))  # fmt: skip


def place(rng: random.Random, correct, distractors, k: int, index: int) -> list:
    """k distinct options with `correct` at `index` and k-1 distractors drawn from the candidates."""
    pool = list(dict.fromkeys(d for d in distractors if d != correct))
    options = rng.sample(pool, k - 1)
    options.insert(index, correct)
    return options


def near(rng: random.Random, value: int, spread: int = 5, n: int = 8) -> list[int]:
    """Plausible wrong numbers around `value` (positive, distinct from it)."""
    cands = {value + d for d in range(-spread, spread + 1) if d and value + d > 0}
    cands |= {value * 2, value + 10, max(1, value - 10)}
    cands.discard(value)
    return rng.sample(sorted(cands), min(n, len(cands)))


def two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


# ---------------------------------------------------------------------------------------- per format


def boolq(rng: random.Random, index: int) -> tuple[str, str]:
    truth = index == 0  # answer "true" at index 0, "false" at index 1
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.sample(range(1, 100), 2)
        a, b = (max(a, b), min(a, b)) if truth else (min(a, b), max(a, b))
        q = f"is {a} greater than {b}"
    elif kind == 1:
        n = rng.randrange(2, 100, 2) + (0 if truth else rng.choice((-1, 1)))
        q = f"is {n} an even number"
    elif kind == 2:
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        c = a + b if truth else rng.choice(near(rng, a + b, 3))
        q = f"is {a} plus {b} equal to {c}"
    elif kind == 3:
        i, j = sorted(rng.sample(range(12), 2))
        m1, m2 = (MONTHS[i], MONTHS[j]) if truth else (MONTHS[j], MONTHS[i])
        q = f"does {m1} come before {m2} in the calendar year"
    elif kind == 4:
        big, small, f = rng.choice(UNITS)
        n = rng.randint(1, 9)
        k = f if truth else rng.choice([x for x in (10, 12, 24, 60, 100, 1000, 7) if x != f])
        q = f"are there {n * k} {small} in {n} {big}{'s' if n > 1 else ''}"
    else:
        i, k = rng.randrange(7), rng.randint(1, 10)
        d2 = DAYS[(i + k) % 7] if truth else DAYS[(i + k + rng.randint(1, 6)) % 7]
        q = f"is it {d2} {k} day{'s' if k > 1 else ''} after a {DAYS[i]}"
    instruction = f"Please answer the following question with true or false, question: {q}?\n\nAnswer format: true/false"
    return instruction, "true" if truth else "false"


def piqa(rng: random.Random, index: int) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        item, have = rng.choice(ITEMS), rng.randint(1, 20)
        need = rng.randint(1, 20)
        goal = f"To end up with {have + need} {item} when you already have {have}, you should"
        right, wrong = f"get {need} more {item}.", f"get {rng.choice(near(rng, need, 4))} more {item}."
    elif kind == 1:
        big, small, f = rng.choice(UNITS)
        n = rng.randint(2, 30)
        goal = f"To find how many {small} are in {n} {big}s, you should"
        right, wrong = f"multiply {n} by {f}.", f"divide {n} by {f}."
    elif kind == 2:
        h, d = rng.randint(5, 11), rng.randint(1, 4)
        event = rng.choice(("a meeting", "a class", "a doctor's appointment", "a game", "a dinner"))
        goal = f"To arrive on time for {event} at {h} o'clock when the trip takes {d} hours, you should"
        right, wrong = (
            f"leave at {h - d} o'clock.",
            f"leave at {h + d - 12 if h + d > 12 else h + d} o'clock.",
        )
    else:
        nums = rng.sample(range(1, 50), 4)
        shuffled = nums[:]
        while shuffled == sorted(nums):
            rng.shuffle(shuffled)
        goal = f"To put the numbers {', '.join(map(str, nums))} in order from smallest to largest, you should write"
        right, wrong = ", ".join(map(str, sorted(nums))) + ".", ", ".join(map(str, shuffled)) + "."
    s = [right, wrong] if index == 0 else [wrong, right]
    instruction = (
        f"Please choose the correct solution to the question: {goal}\n\nSolution1: {s[0]}\n\n"
        f"Solution2: {s[1]}\n\nAnswer format: solution1/solution2"
    )
    return instruction, f"solution{index + 1}"


def social_i_qa(rng: random.Random, index: int) -> tuple[str, str]:
    a, b = two_names(rng)
    kind = rng.randrange(4)
    if kind == 0:
        item, n = rng.choice(ITEMS), rng.randint(5, 30)
        k = rng.randint(1, n - 1)
        q = f"{a} had {n} {item} and gave {k} to {b}. How many {item} does {a} have now?"
        options = place(rng, str(n - k), map(str, [n + k, k, n, *near(rng, n - k, 3)]), 3, index)
    elif kind == 1:
        h, labels = rng.randint(3, 9), ["late", "early", "on time"]
        label = labels[rng.randrange(3)]
        h2 = {"late": h + rng.randint(1, 3), "early": h - rng.randint(1, 2), "on time": h}[label]
        q = f"{a}'s meeting started at {h} o'clock and {a} arrived at {h2} o'clock. How would Others describe {a}?"
        options = place(rng, label, labels, 3, index)
    elif kind == 2:
        item, k, each = rng.choice(ITEMS), rng.randint(2, 6), rng.randint(2, 9)
        q = f"{a} has {k * each} {item} to share equally with {k} friends. How many {item} will each friend get?"
        options = place(rng, str(each), map(str, [k * each, k, *near(rng, each, 2)]), 3, index)
    else:
        x, y = rng.sample(range(5, 60), 2)
        q = f"{a} is {x} years old and {b} is {y} years old. Who is older?"
        options = place(rng, a if x > y else b, [a, b, "they are the same age"], 3, index)
    body = "\n\n".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    instruction = f"Please choose the correct answer to the question: {q}\n\n{body}\n\nAnswer format: answer1/answer2/answer3"
    return instruction, f"answer{index + 1}"


def hellaswag(rng: random.Random, index: int) -> tuple[str, str]:
    a = rng.choice(NAMES)
    kind = rng.randrange(5)
    if kind == 0:
        s, n = rng.choice((1, 2, 3, 5, 10)), rng.randint(1, 40)
        label, ctx = "Counting", f"{a} counts out loud: {n}, {n + s}, {n + 2 * s}, and then says"
        right, others = (
            str(n + 3 * s),
            [str(n + 3 * s + d) for d in (-2 * s, -s, s, 2 * s, 1, -1) if n + 3 * s + d > 0],
        )
    elif kind == 1:
        n, s = rng.randint(12, 60), rng.choice((1, 2))
        label, ctx = "Counting", f"{a} counts down: {n}, {n - s}, {n - 2 * s}, and then says"
        right, others = str(n - 3 * s), [str(n - 3 * s + d) for d in (s, 2 * s, 3 * s, -s, -2 * s, 1)]
    elif kind == 2:
        i = rng.randrange(7)
        label = "Calendar"
        ctx = f"{a} lists the days of the week in order: {DAYS[i]}, {DAYS[(i + 1) % 7]}, {DAYS[(i + 2) % 7]}, and then"
        right, others = DAYS[(i + 3) % 7], [d for d in DAYS if d != DAYS[(i + 3) % 7]]
    elif kind == 3:
        i = rng.randrange(12)
        label = "Calendar"
        ctx = f"{a} names the months in order: {MONTHS[i]}, {MONTHS[(i + 1) % 12]}, and then"
        right, others = MONTHS[(i + 2) % 12], [m for m in MONTHS if m != MONTHS[(i + 2) % 12]]
    else:
        i = rng.randrange(22)
        label = "Alphabet"
        ctx = f"{a} recites the alphabet: {', '.join(LETTERS[i : i + 3])}, and then"
        right, others = LETTERS[i + 3], [c for c in LETTERS if c != LETTERS[i + 3]]
    endings = place(rng, right + ".", [o + "." for o in others], 4, index)
    body = "\n\n".join(f"Ending{i + 1}: {e}" for i, e in enumerate(endings))
    instruction = (
        f"Please choose the correct ending to complete the given sentence: {label}: {ctx}\n\n{body}\n\n"
        "Answer format: ending1/ending2/ending3/ending4"
    )
    return instruction, f"ending{index + 1}"


def winogrande(rng: random.Random, index: int) -> tuple[str, str]:
    a, b = two_names(rng)
    first_wins = index == 0  # option1 is always the first-mentioned name
    kind = rng.randrange(4)
    if kind == 0:
        x, y = sorted(rng.sample(range(3, 70), 2), reverse=True)
        word = rng.choice(("older", "younger"))
        if (word == "older") != first_wins:
            x, y = y, x
        sentence = f"{a} is {x} years old and {b} is {y} years old, so _ is {word}."
    elif kind == 1:
        item = rng.choice(ITEMS)
        x, y = sorted(rng.sample(range(1, 40), 2), reverse=True)
        word = rng.choice(("more", "fewer"))
        if (word == "more") != first_wins:
            x, y = y, x
        sentence = f"{a} has {x} {item} and {b} has {y} {item}, so _ has {word} {item}."
    elif kind == 2:
        i, j = sorted(rng.sample(range(12), 2))
        word = rng.choice(("earlier", "later"))
        if (word == "earlier") != first_wins:
            i, j = j, i
        sentence = f"{a} was born in {MONTHS[i]} and {b} was born in {MONTHS[j]} of the same year, so _ was born {word} in the year."
    else:
        km, m = rng.randint(1, 9), rng.choice(range(100, 10000, 100))
        while m == km * 1000:
            m = rng.choice(range(100, 10000, 100))
        word = "farther" if (km * 1000 > m) == first_wins else "a shorter distance"
        sentence = f"{a} ran {km} kilometers and {b} ran {m} meters, so _ ran {word}."
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{sentence}\n\nOption1: {a}\n\nOption2: {b}\n\nAnswer format: option1/option2"
    )
    return instruction, f"option{index + 1}"


def _four(question: str, options: list) -> str:
    body = "\n\n".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    return (
        f"Please choose the correct answer to the question: {question}\n\n{body}\n\n"
        "Answer format: answer1/answer2/answer3/answer4"
    )


def arc_easy(rng: random.Random, index: int) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        big, small, f = rng.choice(UNITS)
        n = rng.randint(2, 20)
        q, right = f"How many {small} are in {n} {big}s?", n * f
        wrong = [n * f * 10, n + f, n * f + f, n * f - f, f, n * (f // 10) if f >= 100 else n * f + 2 * f]
    elif kind == 1:
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        q, right, wrong = f"What is {a} plus {b}?", a + b, [*near(rng, a + b, 4), abs(a - b)]
    elif kind == 2:
        a, b = sorted(rng.sample(range(2, 60), 2), reverse=True)
        q, right, wrong = f"What is {a} minus {b}?", a - b, [*near(rng, a - b, 4), a + b]
    else:
        nums = rng.sample(range(1, 100), 4)
        q = f"Which number is the largest: {', '.join(map(str, nums[:3]))} or {nums[3]}?"
        right, wrong = max(nums), [x for x in nums if x != max(nums)]
        return _four(q, place(rng, right, wrong, 4, index)), f"answer{index + 1}"
    return _four(q, place(rng, right, [w for w in wrong if w > 0], 4, index)), f"answer{index + 1}"


def arc_challenge(rng: random.Random, index: int) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        h, d, v = rng.randint(1, 8), rng.randint(1, 4), rng.choice(("train", "bus", "boat", "plane"))
        q = f"A {v} leaves at {h} o'clock and the trip takes {d} hours. At what time does it arrive?"
        right = f"{h + d} o'clock"
        wrong = [
            f"{x} o'clock"
            for x in (h - d, h + d + 1, h + d - 1, h + d + 2, h + d - 2, h + 2 * d, h)
            if 0 < x <= 12
        ]
    elif kind == 1:
        h, m = rng.randint(1, 5), rng.randint(1, 59)
        q = f"How many minutes are in {h} hours and {m} minutes?"
        right, wrong = 60 * h + m, [100 * h + m, 60 * h, h + m, 60 * (h + 1) + m, 60 * h - m]
    elif kind == 2:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
        q = f"What is {a} times {b} plus {c}?"
        right, wrong = a * b + c, [a * (b + c), a + b + c, a * b - c, a * b, a * b + c + 1]
    else:
        nums = rng.sample(range(1, 100), 4)
        q = f"Which list shows the numbers {', '.join(map(str, nums[:3]))} and {nums[3]} from smallest to largest?"
        ordered = sorted(nums)
        perms = set()
        while len(perms) < 3:
            p = tuple(rng.sample(nums, 4))
            if list(p) != ordered:
                perms.add(p)
        right, wrong = ", ".join(map(str, ordered)), sorted(", ".join(map(str, p)) for p in perms)
    return _four(q, place(rng, right, wrong, 4, index)), f"answer{index + 1}"


def openbookqa(rng: random.Random, index: int) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        i, k = rng.randrange(7), rng.randint(1, 20)
        q, right, wrong = f"If today is {DAYS[i]}, then in {k} days it will be", DAYS[(i + k) % 7], list(DAYS)
    elif kind == 1:
        i, k = rng.randrange(7), rng.randint(1, 20)
        q, right, wrong = f"If today is {DAYS[i]}, then {k} days ago it was", DAYS[(i - k) % 7], list(DAYS)
    elif kind == 2:
        i, k = rng.randrange(12), rng.randint(1, 11)
        q, right, wrong = f"{k} months after {MONTHS[i]} comes", MONTHS[(i + k) % 12], list(MONTHS)
    else:
        i, d, k = rng.randrange(12), rng.randint(1, 20), rng.randint(1, 8)
        q, right = f"{k} days after {MONTHS[i]} {d} is", f"{MONTHS[i]} {d + k}"
        wrong = [f"{MONTHS[i]} {d + k + x}" for x in (-2, -1, 1, 2)] + [f"{MONTHS[(i + 1) % 12]} {d + k}"]
    return _four(q, place(rng, right, wrong, 4, index)), f"answer{index + 1}"


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "boolq": boolq,
    "piqa": piqa,
    "social_i_qa": social_i_qa,
    "hellaswag": hellaswag,
    "winogrande": winogrande,
    "ARC-Easy": arc_easy,
    "ARC-Challenge": arc_challenge,
    "openbookqa": openbookqa,
}


def task_records(task: str, n: int, seed: int, seen: set[str]) -> list[dict]:
    """n records whose questions (the instruction without its options) are new (not in `seen`); answer
    positions cycle, so they are balanced."""
    rng, k = random.Random(f"{seed}/{task}"), NUM_CHOICES.get(task, 4)
    records, tries = [], 0
    while len(records) < n:
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(f"{task}: templates too narrow for {n} distinct records.")
        instruction, answer = GENERATORS[task](rng, len(records) % k)
        stem = instruction.split("\n\n")[0]  # the question without its options
        if stem in seen:
            continue
        seen.add(stem)
        records.append(
            {
                "instruction": instruction,
                "input": "",
                "output": f"the correct answer is {answer}",
                "answer": answer,
            }
        )
    return records


def build(seed: int, train_per_task: int, test_per_task: int) -> tuple[list[dict], dict[str, list[dict]]]:
    seen: set[str] = set()  # shared: no question appears twice anywhere (so train and test are disjoint)
    train, test = [], {}
    for task in TASKS:
        records = task_records(task, test_per_task + train_per_task, seed, seen)
        test[task], train_part = records[:test_per_task], records[test_per_task:]
        train += train_part
    random.Random(f"{seed}/mix").shuffle(train)
    return train, test


def write(out: pathlib.Path, train: list[dict], test: dict[str, list[dict]]) -> None:
    def dump(path: pathlib.Path, records: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    dump(out / "train.json", train)
    for task, records in test.items():
        dump(out / "test" / task / "test.json", records)


def main(argv: list[str] | None = None) -> None:
    default_out = pathlib.Path(__file__).resolve().parent.parent / "denselora_jax" / "demo_data"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=default_out)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-task", type=int, default=300)
    p.add_argument("--test-per-task", type=int, default=60)
    args = p.parse_args(argv)
    train, test = build(args.seed, args.train_per_task, args.test_per_task)
    write(args.out, train, test)
    print(f"wrote {len(train)} train records and {sum(map(len, test.values()))} test records to {args.out}")


if __name__ == "__main__":
    main()
