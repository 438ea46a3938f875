"""Instruction data for training: loading (LLM-Adapters schema), tokenisation with loss masks, the seeded
validation split, and static-shape batches (bucketed lengths, per-process shares, resumable order).

Pipeline: `prepare_data(files, tokenizer, ...)` -> `PreparedData(train, val)` of `TokenizedSet`s;
`TrainBatches(prepared.train, BatchLayout(...), seed=...)` gives one `Batch` per optimizer step, a pure
function of the step (so resuming at step k replays nothing); `eval_batches(prepared.val, ...)` gives the
validation batches. Every process tokenises all records (cheap) but materialises only its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterator, Sequence

import datasets
import numpy as np

from denselora_jax.prompts import generate_prompt

FIELDS = ("instruction", "input", "output", "answer")
MIN_BUCKET = 32


def demo_data_dir() -> pathlib.Path:
    """The bundled demo dataset: `train.json` and `test/<name>/test.json` (see scripts/make_demo_data.py)."""
    return pathlib.Path(__file__).resolve().parent / "demo_data"


# ----------------------------------------------------------------------------------------------- loading


_SNIFF_BYTES = 4096  # bytes read to tell an empty JSON file ("" or "[]") from one with records
_TOKENIZE_CHUNK = 1024  # records tokenized per call: bounds host memory, not a model size


def _is_empty_json(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES).strip()
    return not head or (head.startswith(b"[") and head[1:].strip() == b"]")


def _check_utf8(path: str) -> None:
    """JSON data must be UTF-8; say where it is not (the JSON readers only report a generic failure)."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"data file {path!r} is not valid UTF-8 text (line {line_no}, byte {e.start}); "
                    "re-encode it as UTF-8."
                ) from None


def _load_one(path: str) -> datasets.Dataset:
    if not os.path.exists(path):
        looks_like_hub_id = path.count("/") == 1 and not path.endswith((".json", ".jsonl"))
        if looks_like_hub_id:  # e.g. "org/dataset": only where a network (or a local hub cache) exists
            try:
                return datasets.load_dataset(path, split="train")
            except Exception as e:
                raise FileNotFoundError(
                    f"data file {path!r} does not exist, and loading it as a hub dataset failed ({e})."
                ) from None
        raise FileNotFoundError(f"data file {path!r} does not exist; check data.train_files.")
    if _is_empty_json(path):
        raise ValueError(f"data file {path!r} holds no records; give a file with at least one record.")
    _check_utf8(path)
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:
        raise ValueError(
            f"data file {path!r} could not be read as JSON (a list of records) or JSONL: {e}"
        ) from None
    if len(ds) == 0:
        raise ValueError(f"data file {path!r} holds no records; give a file with at least one record.")
    return ds


def load_records(
    files: str | Sequence[str],
    *,
    required: Sequence[str] = ("instruction", "output"),
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, int]:
    """Records of JSON/JSONL files in the LLM-Adapters schema -> (Dataset of string columns
    instruction, input, output, answer ("" where absent), number of invalid records skipped).

    A record is invalid when a `required` field is missing, empty or not a string; it is an error naming
    the file and record, unless `skip_invalid` (then dropped and counted).
    """
    files = (files,) if isinstance(files, str | os.PathLike) else tuple(files)
    if not files:
        raise ValueError("no data files given; set data.train_files to a list of JSON/JSONL files.")
    columns: dict[str, list[str]] = {k: [] for k in FIELDS}
    skipped = 0
    for path in map(str, files):
        ds = _load_one(path)
        present = ds.select_columns([k for k in FIELDS if k in ds.column_names]).to_dict()
        values = {k: present.get(k, [None] * len(ds)) for k in FIELDS}
        for i in range(len(ds)):
            bad = [k for k in required if not isinstance(values[k][i], str) or not values[k][i].strip()]
            if bad:
                if skip_invalid:
                    skipped += 1
                    continue
                raise ValueError(
                    f"data file {path!r}, record {i} (0-based): field(s) {bad} missing, empty or not text; "
                    "every record needs them. Fix the record, or skip such records (data.skip_invalid=true)."
                )
            for k in FIELDS:
                v = values[k][i]
                columns[k].append("" if v is None else str(v))
    if not columns["instruction"]:
        raise ValueError(f"no valid records in {list(files)} ({skipped} invalid records skipped).")
    return datasets.Dataset.from_dict(columns), skipped


def split_validation(
    ds: datasets.Dataset, val_size: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """A seeded random split of `val_size` records (0: no validation set)."""
    if val_size < 0 or val_size >= len(ds):
        raise ValueError(
            f"data.val_size={val_size} must be in [0, {len(ds)}) for {len(ds)} records; lower it "
            "(0 disables validation)."
        )
    if val_size == 0:
        return ds, None
    split = ds.train_test_split(test_size=val_size, shuffle=True, seed=seed)
    return split["train"], split["test"]


# ------------------------------------------------------------------------------------------ tokenisation


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedSet:
    """Tokenised examples, concatenated: example i is token_ids[offsets[i]:offsets[i+1]]; its tokens at
    positions >= target_starts[i] are loss targets (0 everywhere when training on inputs)."""

    token_ids: np.ndarray  # [total] int32
    offsets: np.ndarray  # [n + 1] int64
    target_starts: np.ndarray  # [n] int64
    cutoff_len: int
    pad_id: int
    num_truncated: int  # examples cut to cutoff_len (these carry no EOS)

    def __len__(self) -> int:
        return len(self.target_starts)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def target_counts(self) -> np.ndarray:
        """Loss tokens per example, as the step counts them (position 0 is never predicted)."""
        return np.maximum(self.lengths - np.maximum(self.target_starts, 1), 0)

    def fingerprint(self) -> str:
        """Identifies the tokenised data (store it with a checkpoint to refuse resuming on other data)."""
        h = hashlib.sha256()
        for a in (self.token_ids, self.offsets, self.target_starts):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _prompt_token_count(tokenizer, prompt: str, offsets) -> int:
    """Tokens that hold prompt text only: with offsets, those ending within the prompt's characters (so a
    merge across the boundary can't shift the mask); otherwise the prompt's own token count (LLM-Adapters)."""
    if offsets is None:
        return len(tokenizer(prompt)["input_ids"])
    n_chars = len(prompt)
    return next((i for i, (_, end) in enumerate(offsets) if end > n_chars), len(offsets))


def tokenize_records(
    ds: datasets.Dataset,
    tokenizer,
    *,
    cutoff_len: int,
    train_on_inputs: bool,
    chunk_size: int = _TOKENIZE_CHUNK,
) -> TokenizedSet:
    """generate_prompt(...) with the output, tokenised (special tokens as the tokenizer adds them); EOS
    appended when the sequence with it fits in cutoff_len, else cut to cutoff_len and counted as truncated."""
    if cutoff_len < 2:
        raise ValueError(f"data.cutoff_len must be >= 2, got {cutoff_len}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; give a tokenizer with an EOS token.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    fast = bool(getattr(tokenizer, "is_fast", False))
    ids: list[np.ndarray] = []
    starts: list[int] = []
    truncated = 0
    for chunk in ds.iter(batch_size=chunk_size):
        rows = list(zip(chunk["instruction"], chunk["input"], chunk["output"]))
        fulls = [generate_prompt(i, x, o) for i, x, o in rows]
        enc = tokenizer(fulls, return_offsets_mapping=fast)
        for j, (instruction, inp, _) in enumerate(rows):
            tokens = list(enc["input_ids"][j])
            offsets = enc["offset_mapping"][j] if fast else None
            n_prompt = _prompt_token_count(tokenizer, generate_prompt(instruction, inp), offsets)
            if len(tokens) + (tokens[-1] != eos) <= cutoff_len:
                tokens += [] if tokens[-1] == eos else [eos]
            else:
                tokens, truncated = tokens[:cutoff_len], truncated + 1
            ids.append(np.asarray(tokens, np.int32))
            starts.append(0 if train_on_inputs else min(n_prompt, len(tokens)))
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in ids])]).astype(np.int64)
    return TokenizedSet(
        token_ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
        offsets=offsets,
        target_starts=np.asarray(starts, np.int64),
        cutoff_len=cutoff_len,
        pad_id=int(pad),
        num_truncated=truncated,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedData:
    train: TokenizedSet
    val: TokenizedSet | None
    num_skipped: int  # invalid records dropped (skip_invalid)

    def summary(self) -> str:
        parts = [f"{len(self.train)} train examples"]
        if self.val is not None:
            parts.append(f"{len(self.val)} validation examples")
        n_trunc = self.train.num_truncated + (self.val.num_truncated if self.val is not None else 0)
        parts.append(f"{n_trunc} truncated to {self.train.cutoff_len} tokens")
        if self.num_skipped:
            parts.append(f"{self.num_skipped} invalid records skipped")
        return ", ".join(parts)


def prepare_data(
    train_files: str | Sequence[str],
    tokenizer,
    *,
    cutoff_len: int = 256,
    val_size: int = 0,
    train_on_inputs: bool = True,
    skip_invalid: bool = False,
    seed: int = 42,
) -> PreparedData:
    """Load, split (seeded) and tokenise: the trainer's single entry point to the data (config keys
    data.train_files, data.cutoff_len, data.val_size, data.train_on_inputs, data.skip_invalid)."""
    ds, skipped = load_records(train_files, skip_invalid=skip_invalid)
    train_ds, val_ds = split_validation(ds, val_size, seed)
    kw = dict(cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    val = tokenize_records(val_ds, tokenizer, **kw) if val_ds is not None else None
    return PreparedData(tokenize_records(train_ds, tokenizer, **kw), val, skipped)


# --------------------------------------------------------------------------------------------- batching


def bucket_lengths(cutoff_len: int, min_length: int = MIN_BUCKET) -> tuple[int, ...]:
    """Padded lengths a batch may take: powers of two from min_length below cutoff_len, and cutoff_len."""
    buckets, b = [], min_length
    while b < cutoff_len:
        buckets.append(b)
        b *= 2
    return (*buckets, cutoff_len)


def _bucket(length: int, buckets: Sequence[int]) -> int:
    return next(b for b in sorted(buckets) if b >= length)


def _rows(data: TokenizedSet, indices: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
    """[len(indices), length] int32 input_ids, attention_mask, loss_mask; index -1 is a fully masked row."""
    n = len(indices)
    ids = np.full((n, length), data.pad_id, np.int32)
    attn, loss = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
    for r, i in enumerate(indices):
        if i < 0:
            continue
        lo, hi = data.offsets[i], data.offsets[i + 1]
        ids[r, : hi - lo] = data.token_ids[lo:hi]
        attn[r, : hi - lo] = 1
        loss[r, data.target_starts[i] : hi - lo] = 1
    return ids, attn, loss


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's `batch_size` examples are cut: accum_steps micro-batches of
    micro_batch_size rows per data-parallel replica; each process holds its contiguous share of each."""

    batch_size: int
    micro_batch_size: int
    data_parallel_size: int = 1
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        for name in ("batch_size", "micro_batch_size", "data_parallel_size", "process_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.micro_rows:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) x data-parallel size ({self.data_parallel_size}) = {self.micro_rows}; "
                "change the batch size, the micro-batch size or the mesh."
            )
        if self.micro_rows % self.process_count:
            raise ValueError(
                f"the {self.micro_rows} rows of a micro-batch cannot be split evenly over "
                f"{self.process_count} processes; change train.micro_batch_size or the mesh."
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} not in [0, {self.process_count}).")

    @property
    def micro_rows(self) -> int:  # global rows of one micro-batch
        return self.micro_batch_size * self.data_parallel_size

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro_rows

    @property
    def local_rows(self) -> int:  # rows of one micro-batch held by this process
        return self.micro_rows // self.process_count


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """One optimizer step for this process: int32 arrays [accum_steps, local_rows, T]."""

    step: int
    epoch: int
    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray  # 1 where the token is a target: loss on logits[..., :-1] vs input_ids[..., 1:]
    num_target_tokens: int  # loss_mask[..., 1:].sum() over the GLOBAL batch (all processes)
    num_tokens: int  # real (attended) tokens in the global batch

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
        }


class TrainBatches:
    """Optimizer-step batches in a deterministic order from (seed, epoch). `batch(step)` depends on the
    step alone, so a resumed run continues exactly where it stopped. An epoch's last, partial batch is
    filled with fully masked rows (every example is used each epoch, as HF Trainer does)."""

    def __init__(
        self, data: TokenizedSet, layout: BatchLayout, *, seed: int, buckets: Sequence[int] | None = None
    ):
        if len(data) == 0:
            raise ValueError("no training examples.")
        self.data, self.layout, self.seed = data, layout, seed
        self.buckets = tuple(buckets) if buckets else bucket_lengths(data.cutoff_len)
        if max(self.buckets) < data.lengths.max():
            raise ValueError(f"largest bucket {max(self.buckets)} < longest example {data.lengths.max()}.")
        self.steps_per_epoch = -(-len(data) // layout.batch_size)
        self._target_counts = data.target_counts()

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.data))

    def global_indices(self, step: int) -> np.ndarray:
        """[accum_steps, micro_rows] example indices of the whole step (-1: padding row)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        b = self.layout.batch_size
        idx = self.order(epoch)[k * b : (k + 1) * b]
        idx = np.concatenate([idx, np.full(b - len(idx), -1, idx.dtype)])
        return idx.reshape(self.layout.accum_steps, self.layout.micro_rows)

    def batch(self, step: int) -> Batch:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        glob = self.global_indices(step)
        real = glob[glob >= 0]
        length = _bucket(int(self.data.lengths[real].max()), self.buckets)
        lo = self.layout.process_index * self.layout.local_rows
        local = glob[:, lo : lo + self.layout.local_rows].reshape(-1)
        shape = (self.layout.accum_steps, self.layout.local_rows, length)
        arrays = [a.reshape(shape) for a in _rows(self.data, local, length)]
        return Batch(
            step=step,
            epoch=step // self.steps_per_epoch,
            input_ids=arrays[0],
            attention_mask=arrays[1],
            loss_mask=arrays[2],
            num_target_tokens=int(self._target_counts[real].sum()),
            num_tokens=int(self.data.lengths[real].sum()),
        )

    def __call__(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[Batch]:
        """Batches for steps start_step, start_step+1, ... (< stop_step; endless when None)."""
        step = start_step
        while stop_step is None or step < stop_step:
            yield self.batch(step)
            step += 1


@dataclasses.dataclass(frozen=True, eq=False)
class EvalBatch:
    """Validation rows for this process: int32 arrays [local_rows, T] (one T for the whole set)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    num_target_tokens: int  # loss_mask[:, 1:].sum() over the GLOBAL batch
    num_examples: int  # real rows in the global batch (the rest are fully masked padding)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
        }


def eval_batches(
    data: TokenizedSet,
    batch_rows: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    buckets: Sequence[int] | None = None,
) -> Iterator[EvalBatch]:
    """The examples in order, `batch_rows` global rows per batch (the last filled with fully masked rows),
    all padded to the bucket of the longest example so the eval step compiles once."""
    if batch_rows < 1 or batch_rows % process_count:
        raise ValueError(
            f"eval batch rows ({batch_rows}) must be >= 1 and divisible by {process_count} processes."
        )
    length = _bucket(int(data.lengths.max()), tuple(buckets) if buckets else bucket_lengths(data.cutoff_len))
    local_rows = batch_rows // process_count
    counts = data.target_counts()
    for start in range(0, len(data), batch_rows):
        glob = np.arange(start, start + batch_rows)
        glob[glob >= len(data)] = -1
        real = glob[glob >= 0]
        local = glob[process_index * local_rows : (process_index + 1) * local_rows]
        ids, attn, loss = _rows(data, local, length)
        yield EvalBatch(ids, attn, loss, int(counts[real].sum()), len(real))
