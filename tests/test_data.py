"""Data pipeline: loading and its errors, tokenisation masks, EOS and truncation, the validation split,
bucketed static batches, deterministic resumable order, per-process shares, evaluation batches."""

import calendar
import collections
import json
import os
import pathlib
import re
import string
import subprocess
import sys

import numpy as np
import pytest

from denselora_jax import data
from denselora_jax.prompts import ANSWER_CHOICES, DATASETS, extract_answer, generate_prompt

RECORDS = [
    {"instruction": f"Please answer the following question with true or false, question: is {a} greater than "
     f"{b}?\n\nAnswer format: true/false", "input": "", "output": f"the correct answer is {str(a > b).lower()}",
     "answer": str(a > b).lower()}
    for a, b in [(3, 9), (12, 4), (7, 70), (81, 18), (5, 6), (40, 2), (11, 13), (99, 1), (8, 16), (30, 3)]
]  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf)
    )


def write_json(path, records, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


def tokenized(tmp_path, tokenizer, records, **kw):
    ds, _ = data.load_records(write_json(tmp_path / "d.json", records))
    return data.tokenize_records(ds, tokenizer, **kw)


def synthetic(lengths, target_starts=None, cutoff_len=64, pad_id=0):
    """A TokenizedSet with example i = [1000*i + 1, 1000*i + 2, ...] so rows identify their example."""
    lengths = np.asarray(lengths)
    ids = np.concatenate([1000 * i + np.arange(1, n + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    starts = np.zeros(len(lengths), np.int64) if target_starts is None else np.asarray(target_starts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return data.TokenizedSet(ids, offsets, starts, cutoff_len, pad_id, 0)


def example_of(row):
    return int(row[0]) // 1000 if row[0] else -1


# ------------------------------------------------------------------------------------------- loading


def test_load_json_and_jsonl_with_differing_columns(tmp_path):
    a = write_json(tmp_path / "a.json", RECORDS[:3])
    b = write_json(tmp_path / "b.jsonl", [{"instruction": "x", "output": "y"}], jsonl=True)
    ds, skipped = data.load_records([a, b])
    assert skipped == 0 and len(ds) == 4
    assert ds[3] == {"instruction": "x", "input": "", "output": "y", "answer": ""}
    assert ds[0] == RECORDS[0]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope\.json' does not exist"):
        data.load_records(str(tmp_path / "nope.json"))
    with pytest.raises(
        FileNotFoundError, match="'no-org/no-data' does not exist, and loading it as a hub dataset"
    ):
        data.load_records("no-org/no-data")  # a hub name: offline here
    for name, text in [("zero.json", ""), ("list.json", " [ ] \n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}' holds no records"):
            data.load_records(str(tmp_path / name))
    (tmp_path / "broken.json").write_text('[{"instruction": "a", ')
    with pytest.raises(ValueError, match=r"broken\.json' could not be read as JSON"):
        data.load_records(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="no data files"):
        data.load_records([])


def test_invalid_records_error_or_are_skipped(tmp_path):
    bad = [*RECORDS[:2], {"instruction": "q", "input": ""}, {"instruction": " ", "output": "o"}, RECORDS[2]]
    path = write_json(tmp_path / "bad.json", bad)
    with pytest.raises(ValueError, match=r"bad\.json', record 2 \(0-based\).*'output'.*data\.skip_invalid"):
        data.load_records(path)
    ds, skipped = data.load_records(path, skip_invalid=True)
    assert skipped == 2 and list(ds["instruction"]) == [r["instruction"] for r in RECORDS[:3]]
    with pytest.raises(ValueError, match=r"record 0.*'answer'"):
        data.load_records(write_json(tmp_path / "noanswer.json", [{"instruction": "a", "output": "b"}]),
                          required=("instruction", "answer"))  # fmt: skip
    with pytest.raises(ValueError, match="no valid records"):
        data.load_records(write_json(tmp_path / "allbad.json", bad[2:4]), skip_invalid=True)


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    ds, _ = data.load_records(write_json(tmp_path / "d.json", RECORDS))
    train, val = (list(d["instruction"]) for d in data.split_validation(ds, 3, seed=7))
    train2, val2 = (list(d["instruction"]) for d in data.split_validation(ds, 3, seed=7))
    val3 = list(data.split_validation(ds, 3, seed=8)[1]["instruction"])
    assert len(val) == 3 and len(train) == 7 and val == val2 and train == train2 and val != val3
    assert sorted(train + val) == sorted(r["instruction"] for r in RECORDS)
    assert data.split_validation(ds, 0, seed=7) == (ds, None)
    with pytest.raises(ValueError, match=r"data\.val_size=10 must be in \[0, 10\)"):
        data.split_validation(ds, 10, seed=7)


# -------------------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_tokenisation_masks_and_eos(tmp_path, tokenizer, train_on_inputs):
    tok = tokenized(tmp_path, tokenizer, RECORDS, cutoff_len=256, train_on_inputs=train_on_inputs)
    assert tok.num_truncated == 0 and tok.pad_id == tokenizer.pad_token_id
    for i, r in enumerate(RECORDS):
        ids = tok.token_ids[tok.offsets[i] : tok.offsets[i + 1]]
        full = generate_prompt(r["instruction"], r["input"], r["output"])
        assert ids.tolist() == tokenizer(full)["input_ids"] + [tokenizer.eos_token_id]
        if train_on_inputs:
            assert tok.target_starts[i] == 0
        else:  # the targets are exactly the response and EOS; the rest is exactly the prompt
            start = tok.target_starts[i]
            assert tokenizer.decode(ids[start:]) == r["output"] + tokenizer.eos_token
            assert tokenizer.decode(ids[:start]) == generate_prompt(r["instruction"], r["input"])
    assert tok.target_counts().tolist() == (tok.lengths - np.maximum(tok.target_starts, 1)).tolist()


def test_truncation_drops_eos_and_is_counted(tmp_path, tokenizer):
    fulls = [generate_prompt(r["instruction"], r["input"], r["output"]) for r in RECORDS]
    n_text = [len(tokenizer(f)["input_ids"]) for f in fulls]
    cutoff = sorted(n_text)[4]  # some fit with EOS, one fits without room for EOS, some are longer
    tok = tokenized(tmp_path, tokenizer, RECORDS, cutoff_len=cutoff, train_on_inputs=False)
    for i, full in enumerate(fulls):
        ids = tok.token_ids[tok.offsets[i] : tok.offsets[i + 1]].tolist()
        expected = tokenizer(full)["input_ids"]
        if n_text[i] + 1 <= cutoff:
            assert ids == [*expected, tokenizer.eos_token_id]
        else:
            assert ids == expected[:cutoff] and tokenizer.eos_token_id not in ids
    assert tok.num_truncated == sum(n + 1 > cutoff for n in n_text) >= 1
    assert tok.lengths.max() == cutoff
    # Cut inside the prompt: no target left, nothing to learn from that row.
    tiny = tokenized(tmp_path, tokenizer, RECORDS[:1], cutoff_len=8, train_on_inputs=False)
    assert tiny.target_counts().tolist() == [0] and tiny.num_truncated == 1


def test_tokenizer_without_offsets_masks_like_llm_adapters(tmp_path, tokenizer):
    """Without offset mappings (slow tokenizers) the prompt's own token count is masked, as LLM-Adapters."""

    class Slow:
        is_fast = False
        eos_token_id, pad_token_id = tokenizer.eos_token_id, None

        def __call__(self, texts, return_offsets_mapping=False):
            assert not return_offsets_mapping
            return tokenizer(texts)

    fast = tokenized(tmp_path, tokenizer, RECORDS, cutoff_len=256, train_on_inputs=False)
    slow = tokenized(tmp_path, Slow(), RECORDS, cutoff_len=256, train_on_inputs=False)
    prompts = [generate_prompt(r["instruction"]) for r in RECORDS]
    assert slow.target_starts.tolist() == [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert slow.target_starts.tolist() == fast.target_starts.tolist()
    assert slow.pad_id == tokenizer.eos_token_id  # no pad token: EOS pads


def test_tokenizer_without_eos_is_refused(tmp_path, tokenizer):
    class NoEos:
        eos_token_id = None

    ds, _ = data.load_records(write_json(tmp_path / "d.json", RECORDS))
    with pytest.raises(ValueError, match="no eos_token_id"):
        data.tokenize_records(ds, NoEos(), cutoff_len=64, train_on_inputs=True)


# ------------------------------------------------------------------------------------------ batching


def test_bucket_lengths():
    assert data.bucket_lengths(256) == (32, 64, 128, 256)
    assert data.bucket_lengths(100) == (32, 64, 100)
    assert data.bucket_lengths(16) == (16,)


def test_batches_shapes_masks_and_bounded_buckets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=37)
    starts = rng.integers(0, 5, size=37)
    tok = synthetic(lengths, starts, cutoff_len=120, pad_id=7)
    layout = data.BatchLayout(batch_size=8, micro_batch_size=2, data_parallel_size=2)
    tb = data.TrainBatches(tok, layout, seed=3)
    assert layout.accum_steps == 2 and tb.steps_per_epoch == 5  # 37 = 4 full batches + 5 examples
    shapes, seen = set(), []
    for b in tb(0, tb.steps_per_epoch):
        assert b.input_ids.dtype == np.int32 and b.input_ids.shape[:2] == (2, 4)
        shapes.add(b.input_ids.shape)
        T = b.input_ids.shape[-1]
        assert T in (32, 64, 120)
        rows = b.input_ids.reshape(-1, T)
        attn, loss = b.attention_mask.reshape(-1, T), b.loss_mask.reshape(-1, T)
        real = [example_of(r) for r, a in zip(rows, attn) if a.any()]
        assert min(x for x in (32, 64, 120) if x >= max(lengths[real])) == T  # smallest bucket that fits
        for r, a, m in zip(rows, attn, loss):
            n = int(a.sum())
            if n == 0:  # padding row of the epoch's last batch: fully masked
                assert (r == 7).all() and not m.any()
                continue
            i = example_of(r)
            assert n == lengths[i] and (r[:n] == 1000 * i + np.arange(1, n + 1)).all() and (r[n:] == 7).all()
            assert m.tolist() == [int(starts[i] <= t < n) for t in range(T)]
        assert b.num_target_tokens == int(b.loss_mask[..., 1:].sum())
        assert b.num_tokens == int(b.attention_mask.sum())
        seen += real
    assert sorted(seen) == list(range(37))  # every example exactly once per epoch
    assert len(shapes) <= len(tb.buckets)
    with pytest.raises(ValueError, match="largest bucket 64 < longest example"):
        data.TrainBatches(tok, layout, seed=3, buckets=(32, 64))


def test_order_is_deterministic_per_seed_and_epoch():
    tok = synthetic(np.full(24, 10))
    layout = data.BatchLayout(batch_size=4, micro_batch_size=4)
    a, b = data.TrainBatches(tok, layout, seed=1), data.TrainBatches(tok, layout, seed=1)
    for x, y in zip(a(0, 12), b(0, 12)):
        assert (x.input_ids == y.input_ids).all() and x.step == y.step and x.epoch == y.epoch
    epoch0 = np.concatenate([a.global_indices(s).ravel() for s in range(6)])
    epoch1 = np.concatenate([a.global_indices(s).ravel() for s in range(6, 12)])
    other = np.concatenate(
        [data.TrainBatches(tok, layout, seed=2).global_indices(s).ravel() for s in range(6)]
    )
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert (epoch0 != epoch1).any() and (epoch0 != other).any()


def test_resume_at_step_k_replays_nothing():
    tok = synthetic(np.random.default_rng(1).integers(3, 60, size=30), cutoff_len=64)
    layout = data.BatchLayout(batch_size=8, micro_batch_size=4)
    straight = list(data.TrainBatches(tok, layout, seed=5)(0, 13))
    for k in (0, 3, 4, 9):  # 4 steps per epoch: inside and at epoch boundaries
        resumed = list(data.TrainBatches(tok, layout, seed=5)(k, 13))
        assert [b.step for b in resumed] == list(range(k, 13))
        for x, y in zip(resumed, straight[k:]):
            for key in ("input_ids", "attention_mask", "loss_mask"):
                np.testing.assert_array_equal(x.arrays()[key], y.arrays()[key])


def test_process_shares_are_disjoint_and_form_the_global_batch():
    tok = synthetic(np.random.default_rng(2).integers(3, 60, size=50), cutoff_len=64)
    kw = dict(batch_size=16, micro_batch_size=2, data_parallel_size=4)
    whole = data.TrainBatches(tok, data.BatchLayout(**kw), seed=9)
    parts = [
        data.TrainBatches(tok, data.BatchLayout(**kw, process_index=p, process_count=2), seed=9)
        for p in (0, 1)
    ]
    for step in range(5):
        g, (p0, p1) = whole.batch(step), [p.batch(step) for p in parts]
        assert p0.input_ids.shape == (2, 4, g.input_ids.shape[-1]) == p1.input_ids.shape
        for key in (
            "input_ids",
            "attention_mask",
            "loss_mask",
        ):  # process p holds rows [4p, 4p+4) of each micro-batch
            np.testing.assert_array_equal(
                np.concatenate([p0.arrays()[key], p1.arrays()[key]], axis=1), g.arrays()[key]
            )
        ex0 = {example_of(r) for r in p0.input_ids.reshape(-1, p0.input_ids.shape[-1])} - {-1}
        ex1 = {example_of(r) for r in p1.input_ids.reshape(-1, p1.input_ids.shape[-1])} - {-1}
        assert not ex0 & ex1
        assert p0.num_target_tokens == p1.num_target_tokens == g.num_target_tokens  # global counts


def test_layout_errors():
    with pytest.raises(ValueError, match=r"batch_size=16 must be a multiple of .* = 32"):
        data.BatchLayout(batch_size=16, micro_batch_size=4, data_parallel_size=8)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        data.BatchLayout(batch_size=8, micro_batch_size=4, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        data.BatchLayout(batch_size=8, micro_batch_size=4, process_index=2, process_count=2)


def test_eval_batches_fixed_shape_all_examples_masked_padding():
    lengths = np.random.default_rng(3).integers(3, 50, size=11)
    tok = synthetic(lengths, np.full(11, 2), cutoff_len=64)
    batches = list(data.eval_batches(tok, 4))
    assert len(batches) == 3 and {b.input_ids.shape for b in batches} == {(4, 64)}
    rows = np.concatenate([b.input_ids for b in batches])
    assert [example_of(r) for r in rows] == [*range(11), -1]
    last = batches[-1]
    assert last.num_examples == 3 and not last.attention_mask[3].any() and not last.loss_mask[3].any()
    assert sum(b.num_target_tokens for b in batches) == int(sum(np.maximum(lengths - 2, 0)))
    halves = [list(data.eval_batches(tok, 4, process_index=p, process_count=2)) for p in (0, 1)]
    for b, h0, h1 in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([h0.loss_mask, h1.loss_mask]), b.loss_mask)
        assert h0.num_target_tokens == b.num_target_tokens


def test_prepare_data_on_demo_data(tokenizer):
    prepared = data.prepare_data(str(data.demo_data_dir() / "train.json"), tokenizer, cutoff_len=256,
                                 val_size=120, train_on_inputs=False, seed=42)  # fmt: skip
    n = len(json.loads((data.demo_data_dir() / "train.json").read_text()))
    assert len(prepared.val) == 120 and len(prepared.train) == n - 120
    assert prepared.train.num_truncated == 0 and "120 validation examples" in prepared.summary()
    again = data.prepare_data(str(data.demo_data_dir() / "train.json"), tokenizer, cutoff_len=256,
                              val_size=120, train_on_inputs=False, seed=42)  # fmt: skip
    assert again.train.fingerprint() == prepared.train.fingerprint() != prepared.val.fingerprint()


# ----------------------------------------------------------------------------------- bundled demo data

TEST_SETS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
)
DAY = list(calendar.day_name)  # Monday first
MONTH = list(calendar.month_name)[1:]
PER = {"meter": 100, "kilometer": 1000, "hour": 60, "minute": 60, "day": 24, "week": 7, "year": 12,
       "kilogram": 1000, "dollar": 100, "liter": 1000}  # fmt: skip
FORMAT_OF_PREFIX = {
    "Please answer the following question with true or false": "true/false",
    "Please choose the correct solution to the question": "solution1/solution2",
    "Please choose the correct ending to complete the given sentence": "ending1/ending2/ending3/ending4",
    "Please choose the correct answer to fill in the blank": "option1/option2",
    "Please choose the correct answer to the question": "answer",
}


def _later(a, b):  # the later of two values, for "x, y, z, and then" sequences
    return str(int(b) + (int(b) - int(a)))


# An independent oracle for every template: (pattern on the question, the correct answer's text or truth).
FACTS = [
    (r"is (\d+) greater than (\d+)\?", lambda a, b: int(a) > int(b)),
    (r"is (\d+) an even number\?", lambda n: int(n) % 2 == 0),
    (r"is (\d+) plus (\d+) equal to (\d+)\?", lambda a, b, c: int(a) + int(b) == int(c)),
    (r"does (\w+) come before (\w+) in the calendar year\?", lambda a, b: MONTH.index(a) < MONTH.index(b)),
    (r"are there (\d+) \w+ in (\d+) (\w+?)s?\?", lambda k, n, big: int(k) == int(n) * PER[big]),
    (r"is it (\w+) (\d+) days? after a (\w+)\?", lambda d, k, d0: DAY[(DAY.index(d0) + int(k)) % 7] == d),
    (r"end up with (\d+) (\w+) when you already have (\d+),", lambda t, item, a: f"get {int(t) - int(a)} more {item}."),
    (r"how many \w+ are in (\d+) (\w+)s, you should", lambda n, big: f"multiply {n} by {PER[big]}."),
    (r"at (\d+) o'clock when the trip takes (\d+) hours", lambda h, d: f"leave at {int(h) - int(d)} o'clock."),
    (r"put the numbers ([\d, ]+) in order .* you should write", lambda s: ", ".join(sorted(s.split(", "), key=int)) + "."),
    (r"had (\d+) \w+ and gave (\d+) to", lambda n, k: str(int(n) - int(k))),
    (r"meeting started at (\d+) o'clock and \w+ arrived at (\d+)",
     lambda h, a: "late" if int(a) > int(h) else "early" if int(a) < int(h) else "on time"),
    (r"has (\d+) \w+ to share equally with (\d+) friends", lambda n, k: str(int(n) // int(k))),
    (r"(\w+) is (\d+) years old and (\w+) is (\d+) years old. Who is older\?", lambda a, x, b, y: a if int(x) > int(y) else b),
    (r"counts (?:out loud|down): \d+, (\d+), (\d+), and then says", lambda a, b: _later(a, b) + "."),
    (r"days of the week in order: \w+, \w+, (\w+), and then", lambda d: DAY[(DAY.index(d) + 1) % 7] + "."),
    (r"months in order: \w+, (\w+), and then", lambda m: MONTH[(MONTH.index(m) + 1) % 12] + "."),
    (r"alphabet: \w, \w, (\w), and then", lambda c: string.ascii_uppercase[string.ascii_uppercase.index(c) + 1] + "."),
    (r"(\w+) is (\d+) years old and (\w+) is (\d+) years old, so _ is (\w+)\.",
     lambda a, x, b, y, w: a if (int(x) > int(y)) == (w == "older") else b),
    (r"(\w+) has (\d+) \w+ and (\w+) has (\d+) \w+, so _ has (\w+) ",
     lambda a, x, b, y, w: a if (int(x) > int(y)) == (w == "more") else b),
    (r"(\w+) was born in (\w+) and (\w+) was born in (\w+) of the same year, so _ was born (\w+) ",
     lambda a, m, b, n, w: a if (MONTH.index(m) < MONTH.index(n)) == (w == "earlier") else b),
    (r"(\w+) ran (\d+) kilometers and (\w+) ran (\d+) meters, so _ ran (farther|a shorter)",
     lambda a, km, b, m, w: a if (1000 * int(km) > int(m)) == (w == "farther") else b),
    (r"How many (\w+) are in (\d+) (\w+)s\?", lambda _, n, big: str(int(n) * PER[big])),
    (r"What is (\d+) plus (\d+)\?", lambda a, b: str(int(a) + int(b))),
    (r"What is (\d+) minus (\d+)\?", lambda a, b: str(int(a) - int(b))),
    (r"Which number is the largest: ([\d, ]+) or (\d+)\?", lambda s, d: str(max(map(int, [*s.split(", "), d])))),
    (r"leaves at (\d+) o'clock and the trip takes (\d+) hours", lambda h, d: f"{int(h) + int(d)} o'clock"),
    (r"How many minutes are in (\d+) hours and (\d+) minutes\?", lambda h, m: str(60 * int(h) + int(m))),
    (r"What is (\d+) times (\d+) plus (\d+)\?", lambda a, b, c: str(int(a) * int(b) + int(c))),
    (r"Which list shows the numbers ([\d, ]+) and (\d+) from smallest",
     lambda s, d: ", ".join(map(str, sorted(map(int, [*s.split(", "), d]))))),
    (r"If today is (\w+), then in (\d+) days it will be", lambda d, k: DAY[(DAY.index(d) + int(k)) % 7]),
    (r"If today is (\w+), then (\d+) days ago it was", lambda d, k: DAY[(DAY.index(d) - int(k)) % 7]),
    (r"(\d+) months after (\w+) comes", lambda k, m: MONTH[(MONTH.index(m) + int(k)) % 12]),
    (r"(\d+) days after (\w+) (\d+) is", lambda k, m, d: f"{m} {int(d) + int(k)}"),
]  # fmt: skip


def check_demo_record(record):
    """The answer is valid for the record's format, its options are listed, and it is the true one."""
    stem, *parts = record["instruction"].split("\n\n")
    fmt = next(f for p, f in FORMAT_OF_PREFIX.items() if stem.startswith(p))
    assert (
        parts[-1].startswith(f"Answer format: {fmt}")
        and record["output"] == f"the correct answer is {record['answer']}"
    )
    hits = [(i, fn, m) for i, (pattern, fn) in enumerate(FACTS) if (m := re.search(pattern, stem))]
    assert len(hits) == 1, stem
    template, fn, match = hits[0]
    expected = fn(*match.groups())
    if fmt == "true/false":
        assert record["answer"] == str(expected).lower()
        return template
    options = dict(re.fullmatch(r"(\w+\d): (.*)", p, re.S).groups() for p in parts[:-1])
    assert parts[-1] == "Answer format: " + "/".join(k.lower() for k in options)
    assert len(set(options.values())) == len(options) >= 2  # distinct options
    assert record["answer"] in {k.lower() for k in options}
    assert options[record["answer"].capitalize()] == expected
    return template


def load_demo():
    root = data.demo_data_dir()
    train, _ = data.load_records(str(root / "train.json"), required=("instruction", "output", "answer"))
    tests = {
        name: data.load_records(
            str(root / "test" / name / "test.json"), required=("instruction", "output", "answer")
        )[0]
        for name in TEST_SETS
    }
    return train.to_list(), {k: v.to_list() for k, v in tests.items()}


def test_demo_data_is_valid_true_balanced_and_disjoint():
    assert TEST_SETS == DATASETS
    train, tests = load_demo()
    assert 1500 <= len(train) <= 3000
    templates = collections.Counter()
    for name, records in tests.items():
        assert 50 <= len(records) <= 100
        counts = collections.Counter(r["answer"] for r in records)
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) >= 2  # balanced positions
        for r in records:
            assert r["input"] == "" and r["answer"] in ANSWER_CHOICES[name]
            templates[check_demo_record(r)] += 1
            assert extract_answer(name, generate_prompt(r["instruction"]) + r["output"]) == r["answer"]
    for r in train:
        templates[check_demo_record(r)] += 1
    assert set(templates) == set(range(len(FACTS)))  # every template is used (and checked)
    formats = collections.Counter(
        next(f for p, f in FORMAT_OF_PREFIX.items() if r["instruction"].startswith(p)) for r in train
    )
    assert (
        len(formats) == 5 and min(formats.values()) >= 200
    )  # all formats (the answerN ones shared by four sets)
    answers = collections.Counter(r["answer"] for r in train)
    assert set(answers) == {c for name in DATASETS for c in ANSWER_CHOICES[name] if c != "answer5"}
    question = lambda r: r["instruction"].split("\n\n")[0]  # noqa: E731
    train_questions = {question(r) for r in train}
    test_questions = [question(r) for records in tests.values() for r in records]
    assert len(train_questions) == len(train) and len(set(test_questions)) == len(test_questions)
    assert not train_questions & set(test_questions)


def test_demo_generator_is_deterministic(tmp_path):
    script = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "make_demo_data.py"
    for out in ("a", "b"):
        subprocess.run(
            [sys.executable, str(script), "--out", str(tmp_path / out)], check=True, capture_output=True
        )
    shipped = sorted(p.relative_to(data.demo_data_dir()) for p in data.demo_data_dir().rglob("*.json"))
    assert len(shipped) == 9 and shipped == sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.json")
    )
    for rel in shipped:  # the shipped files are exactly the generator's output
        assert (
            (tmp_path / "a" / rel).read_bytes()
            == (tmp_path / "b" / rel).read_bytes()
            == (data.demo_data_dir() / rel).read_bytes()
        )
    subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "c"), "--seed", "1"],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "c" / "train.json").read_bytes() != (tmp_path / "a" / "train.json").read_bytes()
