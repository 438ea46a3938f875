"""The commonsense evaluation of the paper (LLM-Adapters protocol) and `python -m denselora_jax.evaluate`.

Mode GENERATE (the paper's numbers): the training prompt template, 4-beam search with at most 32 new tokens,
and the prediction = the first match of the dataset's answer pattern in the text after "### Response:"
(prompts.extract_answer); no match is wrong. Mode LOGLIK (a fast check, reported as such, never mixed
with generation results): each candidate answer is scored by the summed log-probability of the response
the training data uses ("the correct answer is <choice>") after the prompt; the best one is the prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from denselora_jax.decoding import generate, load_checked_adapter, pad_left
from denselora_jax.model.config import ModelConfig
from denselora_jax.model.llama import forward_cached, init_cache, positions_from_mask
from denselora_jax.model.loading import load_pretrained, load_tokenizer
from denselora_jax.prompts import ANSWER_CHOICES, DATASETS, extract_answer, generate_prompt, response_text

log = logging.getLogger(__name__)

TEST_FILE = "test.json"
# The response every training record of LLM-Adapters' commonsense data has (and the bundled demo data).
RESPONSE_TEMPLATE = "the correct answer is {}"


class Mode(enum.StrEnum):
    GENERATE = "generate"  # beam search + answer extraction, as the paper
    LOGLIK = "loglik"  # candidate scoring by log-likelihood (fast; not the paper's protocol)


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the file and the fix."""


# --- data -------------------------------------------------------------------------------------------------


def find_test_sets(data_dir, names: Sequence[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """({name: path of DIR/<name>/test.json} for the datasets present, [names missing]).

    Unknown names and a directory with none of the datasets are errors; single missing ones are not.
    """
    data_dir = os.fspath(data_dir)
    names = list(DATASETS if names is None else names.split(",") if isinstance(names, str) else names)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise EvalDataError(
            f"unknown dataset name(s) {unknown}; the commonsense datasets are: {', '.join(DATASETS)} "
            "(exact names, as the LLM-Adapters dataset folders)."
        )
    if not os.path.isdir(data_dir):
        raise EvalDataError(f"data dir {data_dir} does not exist; give the folder holding <name>/test.json.")
    paths = {n: os.path.join(data_dir, n, TEST_FILE) for n in names}
    present = {n: p for n, p in paths.items() if os.path.isfile(p)}
    if not present:
        raise EvalDataError(
            f"{data_dir} holds none of the datasets {names}: expected {data_dir}/<name>/{TEST_FILE} "
            f"(LLM-Adapters layout, e.g. {paths[names[0]]})."
        )
    return present, [n for n in names if n not in present]


def load_test_set(name: str, path: str, limit: int | None = None) -> list[dict]:
    """The records of one test.json (first `limit`), checked: each needs `instruction` and a valid `answer`."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvalDataError(f"{path}: cannot read it as JSON ({e}).") from None
    if not isinstance(records, list) or not records:
        raise EvalDataError(
            f"{path}: expected a non-empty JSON list of records, got {type(records).__name__}."
        )
    records = records[:limit] if limit is not None else records
    choices = ANSWER_CHOICES[name]
    for i, r in enumerate(records):
        missing = [k for k in ("instruction", "answer") if not isinstance(r, dict) or k not in r]
        if missing:
            raise EvalDataError(
                f"{path}: record {i} has no {' or '.join(repr(k) for k in missing)} field; LLM-Adapters test "
                "records need 'instruction' and 'answer' (e.g. the dataset/<name>/test.json files)."
            )
        if r["answer"] not in choices:
            raise EvalDataError(
                f"{path}: record {i} has answer {r['answer']!r}, not one of {name}'s answers "
                f"{'/'.join(choices)}; is this the right dataset folder?"
            )
    return records


def candidates(name: str, instruction: str) -> tuple[str, ...]:
    """The answers a record offers: the dataset's choices named in its instruction (e.g. its "Answer
    format: answer1/answer2/answer3" line), or all of the dataset's choices when fewer than two are."""
    text = instruction.lower()
    named = tuple(c for c in ANSWER_CHOICES[name] if c in text)
    return named if len(named) >= 2 else ANSWER_CHOICES[name]


def _bucket(n: int, smallest: int = 32) -> int:
    """Round a length up to one of four steps per octave (<= 25% padding, few compiled shapes)."""
    if n <= smallest:
        return smallest
    step = 1 << max(0, n.bit_length() - 3)
    return -(-n // step) * step


# --- the two modes ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Run:
    """What both modes need besides the records."""

    config: ModelConfig
    params: Any
    tok: Any
    batch_size: int
    adapter: Any
    adapter_config: Any
    num_beams: int
    max_new_tokens: int


def _predict_generate(run: _Run, name, records, bar):
    cfg, tok, batch_size = run.config, run.tok, run.batch_size
    eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = [tok(generate_prompt(r["instruction"], r.get("input")))["input_ids"] for r in records]
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    out: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [prompts[i] for i in idx] + [prompts[idx[0]]] * (batch_size - len(idx))  # one static batch
        ids, mask = pad_left(rows, pad, multiple=_bucket(max(map(len, rows))))
        kw = {"max_new_tokens": run.max_new_tokens, "num_beams": run.num_beams, "eos_token_id": eos}
        ad = {"adapter": run.adapter, "adapter_config": run.adapter_config}
        seqs = generate(cfg, run.params, ids, mask, pad_token_id=pad, **kw, **ad)
        for i, seq in zip(idx, seqs):
            text = tok.decode(seq[ids.shape[1] - len(prompts[i]) :], skip_special_tokens=True)
            out[i] = {"response": response_text(text).strip(), "prediction": extract_answer(name, text)}
        bar([(out[i], records[i]) for i in idx])
    return [out[i] for i in range(len(records))]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _response_logprobs(config, adapter_config, params, adapter, prompt_bp, pmask_bp, resp_bcr, rmask_bcr):
    """Summed log-probs [B, C] of C candidate responses [B, C, R] (right-padded) after each record's prompt
    [B, P] (left-padded): the prompt runs once, each response continues from a copy of its KV cache."""
    ad = {"adapter": adapter, "adapter_config": adapter_config}
    (B, P), (C, R) = prompt_bp.shape, resp_bcr.shape[1:]
    kv_bs = jnp.concatenate([pmask_bp, jnp.ones((B, R), pmask_bp.dtype)], axis=1)  # causality hides the tail
    cache = init_cache(config, B, P + R)
    logits_bpv, cache = forward_cached(
        config, params, prompt_bp, positions_from_mask(pmask_bp), kv_bs, cache, 0, **ad
    )
    cache = jax.tree.map(lambda c: jnp.repeat(c, C, axis=1), cache)
    resp_nr, rmask_nr = resp_bcr.reshape(B * C, R), rmask_bcr.reshape(B * C, R)
    pos_nr = jnp.repeat(pmask_bp.sum(-1), C)[:, None] + jnp.arange(R)[None, :]
    kv_ns = jnp.concatenate([jnp.repeat(pmask_bp, C, axis=0), rmask_nr], axis=1)
    logits_nrv, _ = forward_cached(config, params, resp_nr, pos_nr, kv_ns, cache, P, **ad)
    # Token j of a response is predicted by the prompt's last position (j = 0) or response position j - 1.
    pred_nrv = jnp.concatenate([jnp.repeat(logits_bpv[:, -1:], C, axis=0), logits_nrv[:, :-1]], axis=1)
    logp_nrv = jax.nn.log_softmax(pred_nrv.astype(jnp.float32), axis=-1)
    lp_nr = jnp.take_along_axis(logp_nrv, resp_nr[:, :, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(rmask_nr > 0, lp_nr, 0.0), axis=-1).reshape(B, C)


def encode_candidates(tok, record: dict, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt tokens, [response tokens per choice]), where prompt + response_c is exactly the tokenisation
    of generate_prompt(instruction, input, RESPONSE_TEMPLATE.format(c)), as in training. The prompt part is
    the common prefix of those tokenisations with the prompt's own (a merge across the boundary moves the
    merged token into the responses)."""
    prompt = generate_prompt(record["instruction"], record.get("input"))
    head = tok(prompt)["input_ids"]
    fulls = [
        tok(generate_prompt(record["instruction"], record.get("input"), RESPONSE_TEMPLATE.format(c)))[
            "input_ids"
        ]
        for c in choices
    ]
    n = min(len(head), *(len(f) - 1 for f in fulls))
    for f in fulls:
        n = next((k for k in range(n) if f[k] != head[k]), n)
    return head[:n], [f[n:] for f in fulls]


def _predict_loglik(run: _Run, name, records, bar):
    tok, batch_size = run.tok, run.batch_size
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    C = len(ANSWER_CHOICES[name])  # static candidate slots per dataset; unused ones are masked
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        offered = [candidates(name, r["instruction"]) for r in chunk]
        enc = [encode_candidates(tok, r, cs) for r, cs in zip(chunk, offered)]
        heads = [h for h, _ in enc] + [enc[0][0]] * (batch_size - len(chunk))  # one static batch
        ids, mask = pad_left(heads, pad, multiple=_bucket(max(map(len, heads))))
        R = _bucket(max(len(t) for _, resp in enc for t in resp), smallest=8)
        resp = np.full((batch_size, C, R), pad, np.int32)
        rmask = np.zeros_like(resp)
        for b, (_, rs) in enumerate(enc):
            for c, t in enumerate(rs):
                resp[b, c, : len(t)], rmask[b, c, : len(t)] = t, 1
        args = (run.config, run.adapter_config, run.params, run.adapter, ids, mask, resp, rmask)
        scores = np.asarray(_response_logprobs(*args))
        preds = []
        for b, cs in enumerate(offered):
            s = {c: float(scores[b, k]) for k, c in enumerate(cs)}
            preds.append({"scores": s, "prediction": max(s, key=s.get)})  # the first best wins a tie
        bar(list(zip(preds, chunk)))
        out += preds
    return out


# --- driver -----------------------------------------------------------------------------------------------


def evaluate(
    config: ModelConfig,
    params,
    tokenizer,
    data_dir,
    *,
    datasets: Sequence[str] | None = None,
    adapter=None,
    adapter_config=None,
    limit: int | None = None,
    batch_size: int = 8,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    mode: Mode | str = Mode.GENERATE,
    output_dir=None,
    progress: bool = True,
) -> dict:
    """Accuracy of the model (with the adapter, if any) on DIR/<name>/test.json for each dataset present.

    adapter: an adapter tree (with adapter_config), or an adapter directory, which is loaded and checked
    against this base model's fingerprint. Returns (and, with output_dir, writes as results.json next to
    results.md and <name>.jsonl predictions) {"mode", "settings", "datasets": {name: {"accuracy",
    "correct", "total", "no_match"}}, "mean_accuracy" (unweighted over the datasets evaluated), "missing"}.
    """
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(f"evaluate: mode must be one of {', '.join(Mode)}, got {mode!r}.") from None
    if not (isinstance(batch_size, int) and batch_size >= 1) or (limit is not None and limit < 1):
        raise ValueError(
            f"evaluate: batch_size must be >= 1 and limit None or >= 1 (got {batch_size}, {limit})."
        )
    if isinstance(adapter, (str, os.PathLike)):
        adapter, adapter_config = load_checked_adapter(config, params, adapter)
    if adapter is not None and adapter_config is None:
        raise ValueError("evaluate: an adapter tree was given without its adapter_config.")
    present, missing = find_test_sets(data_dir, datasets)
    for n in missing:
        log.warning("evaluate: %s not found (%s/%s/%s); skipped.", n, os.fspath(data_dir), n, TEST_FILE)
    settings = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
    run = _Run(config, params, tokenizer, batch_size, adapter, adapter_config, num_beams, max_new_tokens)
    per_dataset, predictions = {}, {}
    test_sets = {
        name: load_test_set(name, path, limit) for name, path in present.items()
    }  # all checked first
    for name, records in test_sets.items():
        stats = {"correct": 0, "seen": 0}
        bar_ = tqdm(total=len(records), desc=f"{name} ({mode})", disable=not progress, file=sys.stderr)

        def bar(done, stats=stats, bar_=bar_):  # done: [(prediction, record)] of one batch
            stats["correct"] += sum(p["prediction"] == r["answer"] for p, r in done)
            stats["seen"] += len(done)
            bar_.update(len(done))
            bar_.set_postfix(acc=f"{stats['correct'] / stats['seen']:.3f}")

        preds = (_predict_generate if mode == Mode.GENERATE else _predict_loglik)(run, name, records, bar)
        bar_.close()
        rows = [
            {
                "index": i,
                "instruction": r["instruction"],
                "answer": r["answer"],
                **p,
                "correct": p["prediction"] == r["answer"],
            }
            for i, (r, p) in enumerate(zip(records, preds))
        ]
        correct = sum(r["correct"] for r in rows)
        per_dataset[name] = {
            "accuracy": correct / len(rows),
            "correct": correct,
            "total": len(rows),
            "no_match": sum(r["prediction"] is None for r in rows),
        }
        predictions[name] = rows
    results = {
        "mode": str(mode),
        "settings": (
            {**settings, "template": "generate_prompt", "extraction": "first match after '### Response:'"}
            if mode == Mode.GENERATE
            else {"scoring": f"sum of log-probs of {RESPONSE_TEMPLATE.format('<choice>')!r} after the prompt"}
        )
        | {"limit": limit},
        "datasets": per_dataset,
        "mean_accuracy": float(np.mean([d["accuracy"] for d in per_dataset.values()])),
        "missing": missing,
    }
    if output_dir is not None:
        write_results(output_dir, results, predictions)
    return results


def results_markdown(results: dict) -> str:
    s = results["settings"]
    how = (
        f"generation: {s['num_beams']}-beam search, at most {s['max_new_tokens']} new tokens, first answer match"
        if results["mode"] == Mode.GENERATE
        else f"log-likelihood ranking of the candidate answers ({s['scoring']}); not the paper's protocol"
    )
    lines = [
        f"# Commonsense evaluation (mode: {results['mode']})",
        "",
        f"Mode: {how}." + (f" First {s['limit']} records per dataset." if s.get("limit") else ""),
        "",
        "| dataset | accuracy (%) | correct / total | no answer found |",
        "|---|---|---|---|",
    ]
    for name, d in results["datasets"].items():
        lines.append(
            f"| {name} | {100 * d['accuracy']:.1f} | {d['correct']} / {d['total']} | {d['no_match']} |"
        )
    n = len(results["datasets"])
    lines.append(f"| **mean ({n} datasets, unweighted)** | **{100 * results['mean_accuracy']:.1f}** | | |")
    if results["missing"]:
        lines += ["", f"Missing (skipped): {', '.join(results['missing'])}."]
    return "\n".join(lines) + "\n"


def write_results(output_dir, results: dict, predictions: dict[str, list[dict]]) -> None:
    """<output_dir>/<name>.jsonl (one prediction per line), results.json and results.md."""
    os.makedirs(output_dir, exist_ok=True)
    for name, rows in predictions.items():
        with open(os.path.join(output_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(results))


# --- CLI --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m denselora_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory or .gguf file")
    p.add_argument(
        "--adapter", help="adapter directory (save_adapter output); checked against the base model"
    )
    p.add_argument(
        "--force", action="store_true", help="accept an adapter trained on other base weights (same shapes)"
    )
    p.add_argument("--data-dir", required=True, help="folder with <name>/test.json (LLM-Adapters layout)")
    p.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma-separated names (default: all eight)"
    )
    p.add_argument("--limit", type=int, help="evaluate the first N records of each dataset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--mode", choices=[str(m) for m in Mode], default=str(Mode.GENERATE))
    p.add_argument("--output", help="write <name>.jsonl predictions, results.json and results.md here")
    p.add_argument("--dtype", help="parameter dtype, e.g. bfloat16 (default: the checkpoint's)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    kw = {
        k: getattr(args, k) for k in ("adapter", "limit", "batch_size", "num_beams", "max_new_tokens", "mode")
    }
    try:
        for name, path in find_test_sets(args.data_dir, names)[0].items():  # bad data fails before loading
            load_test_set(name, path, args.limit)
        config, params = load_pretrained(args.model, dtype=args.dtype)
        tok = load_tokenizer(args.model)
        if args.adapter:
            kw["adapter"], kw["adapter_config"] = load_checked_adapter(
                config, params, args.adapter, force=args.force
            )
        results = evaluate(config, params, tok, args.data_dir, datasets=names, output_dir=args.output, **kw)
    except (ValueError, FileNotFoundError) as e:  # our errors name the file and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
