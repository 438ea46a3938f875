"""Batched decoding with the KV cache: greedy, sampling and beam search, with transformers' `generate`
semantics (its vectorised beam search ported step for step). The CLI is denselora_jax/generate.py.

One jitted function (`_decode`, static in the model config, the adapter config and the `Decoding` settings)
runs the prefill of the left-padded prompts and then one token per step in a `lax.while_loop` that exits
as soon as every sequence is done. Shapes are static: the cache holds prompt + max_new_tokens - 1 slots.
The adapter (never merged: DenseLoRA is non-linear) runs in the prefill and in every decode step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.adapters.io import load_adapter
from denselora_jax.model.config import ModelConfig
from denselora_jax.model.llama import forward_cached, init_cache, positions_from_mask
from denselora_jax.model.loading import fingerprint

NEG = -1.0e9  # transformers' "impossible" score in beam search (added, not assigned, exactly as there)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """The static decoding settings (hashable: part of the jitted decoder's cache key)."""

    max_new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    num_eos: int = 1  # EOS slots (the ids themselves are run-time values, so they never recompile)
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers

    def __post_init__(self):
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                "max_new_tokens must be >= 1",
            ),
            (isinstance(self.num_beams, int) and self.num_beams >= 1, "num_beams must be >= 1"),
            (self.early_stopping in (True, False, "never"), 'early_stopping must be True, False or "never"'),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"generate: {msg}; got {self!r}.")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling warpers' settings; run-time values of the decoder (changing them never recompiles)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"generate: temperature must be > 0, got {self.temperature!r}.")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"generate: top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1] (1 disables it), got {self.top_p!r}.")

    def arrays(self) -> dict:
        # 1 - top_p is taken in double precision on the host, as transformers does.
        return {
            "temperature": jnp.float32(self.temperature),
            "top_k": jnp.int32(self.top_k),
            "drop_mass": jnp.float32(1.0 - self.top_p),
        }


# --- logits warpers (transformers' Temperature, TopK, TopP, applied in that order, only when sampling) ---


def _warp(w: dict, scores_nv: jax.Array, min_keep: int) -> jax.Array:
    """w: Sampling.arrays(). A disabled warper is an exact no-op (x / 1; no token below the threshold)."""
    scores_nv = scores_nv / w["temperature"]
    k = jnp.clip(jnp.maximum(w["top_k"], min_keep), 1, scores_nv.shape[-1])
    kth = jnp.take_along_axis(
        -jnp.sort(-scores_nv, axis=-1), jnp.broadcast_to(k - 1, scores_nv.shape[:-1])[..., None], -1
    )
    scores_nv = jnp.where((w["top_k"] > 0) & (scores_nv < kth), -jnp.inf, scores_nv)
    order = jnp.argsort(scores_nv, axis=-1)  # ascending, as transformers
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores_nv, order, -1), axis=-1), axis=-1)
    drop_sorted = (cum <= w["drop_mass"]).at[..., -min_keep:].set(False)
    drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), -1)
    return jnp.where(drop, -jnp.inf, scores_nv)


# --- the decoder ------------------------------------------------------------------------------------------


def _gather_beams(x, idx_bk):
    """x [B, K', ...] -> x[b, idx[b, k], ...]."""
    return jnp.take_along_axis(x, idx_bk.reshape(idx_bk.shape + (1,) * (x.ndim - 2)), axis=1)


def _decode_impl(
    config, adapter_config, d: Decoding, params, adapter, ids_bp, mask_bp, eos_e, fill, warp, rng
):
    """Returns (sequences [B, P + max_new], `fill` after each end; generated lengths [B]).

    eos_e: the EOS ids, -1 in unused slots; fill: the id written after a sequence's end."""
    (B, P), K, V = ids_bp.shape, d.num_beams, config.vocab_size
    T = P + d.max_new_tokens
    model = functools.partial(forward_cached, config, params, adapter=adapter, adapter_config=adapter_config)

    # Prefill (once per prompt, before any beam expansion). Future slots are unmasked: causality hides them.
    kv_mask_bs = jnp.concatenate([mask_bp, jnp.ones((B, d.max_new_tokens - 1), mask_bp.dtype)], axis=1)
    logits_bpv, cache = model(
        ids_bp, positions_from_mask(mask_bp), kv_mask_bs, init_cache(config, B, T - 1), 0
    )
    logits_nv = logits_bpv[:, -1]
    if K == 1:
        select, state = _greedy_or_sample(d, P, T, eos_e, fill, warp, ids_bp, rng)
    else:
        select, state = _beam_search(d, B, P, T, V, eos_e, fill, warp, ids_bp, rng)
        cache = jax.tree.map(lambda c: jnp.repeat(c, K, axis=1), cache)  # [L, B*K, ...], beam-minor
        logits_nv = jnp.repeat(logits_nv, K, axis=0)
    state = select({**state, "cache": cache}, logits_nv, jnp.int32(0))
    pos_n, kv_mask_ns = jnp.repeat(mask_bp.sum(-1), K), jnp.repeat(kv_mask_bs, K, axis=0)

    def body(s):  # the token chosen at step i - 1 goes into slot P + i - 1 (position: real length + i - 1)
        i = s["i"]
        logits, cache = model(s["last"][:, None], (pos_n + i - 1)[:, None], kv_mask_ns, s["cache"], P + i - 1)
        return select({**s, "cache": cache}, logits[:, 0], i)

    state = jax.lax.while_loop(lambda s: ~s["done"], body, state)
    return state["out"], state["out_len"]


def _greedy_or_sample(d, P, T, eos, pad, warp, ids_bp, rng):
    B = ids_bp.shape[0]

    def select(s, logits_bv, i):
        if d.do_sample:
            scores = _warp(warp, logits_bv, 1)
            tok_b = jax.random.categorical(jax.random.fold_in(rng, i), scores, axis=-1).astype(jnp.int32)
        else:
            tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        tok_b = jnp.where(s["unfinished"], tok_b, pad)  # finished rows emit the pad token, as transformers
        unfinished = s["unfinished"] & ~jnp.isin(tok_b, eos)
        out = s["out"].at[:, P + i].set(tok_b)
        done = (i + 1 >= d.max_new_tokens) | ~jnp.any(unfinished)
        return {
            **s,
            "i": i + 1,
            "last": tok_b,
            "out": out,
            "unfinished": unfinished,
            "done": done,
            "out_len": jnp.full((B,), i + 1, jnp.int32),
        }

    out = jnp.full((B, T), pad, jnp.int32).at[:, :P].set(ids_bp)
    return select, {"unfinished": jnp.ones((B,), bool), "out": out}


def _beam_search(d, B, P, T, V, eos, fill, warp, ids_bp, rng):
    """transformers' `_beam_search` (v4.50+ vectorised form): keep the top (1 + n_eos) * K candidates
    (at least 2K), continue the best K that did not just finish, merge finished ones into the K best
    hypotheses by length-penalised score, and stop by its early-stopping heuristic."""
    K = d.num_beams
    n_keep = max(2, 1 + d.num_eos) * K  # num_eos = max(1, #EOS ids) gives transformers' numbers for 0 too
    min_keep = d.num_eos + 1
    top_num_beam = jnp.arange(n_keep) < K
    es_true = d.early_stopping is True

    def select(s, logits_nv, i):
        logp_bkv = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1)
        if d.do_sample:
            logp_bkv = _warp(warp, logp_bkv, min_keep)
        acc_bx = (logp_bkv.reshape(B, K, V) + s["run_scores"][:, :, None]).reshape(B, K * V)
        if d.do_sample:  # n_keep draws without replacement from softmax(acc) (Gumbel top-k), then by score
            g = jax.random.gumbel(jax.random.fold_in(rng, i), acc_bx.shape)
            idx = jax.lax.top_k(acc_bx + g, n_keep)[1]
            vals = jnp.take_along_axis(acc_bx, idx, -1)
            order = jnp.argsort(-vals, axis=-1, stable=True)
            vals, idx = jnp.take_along_axis(vals, order, -1), jnp.take_along_axis(idx, order, -1)
        else:
            vals, idx = jax.lax.top_k(acc_bx, n_keep)
        src, tok = idx // V, (idx % V).astype(jnp.int32)
        cand_seqs = _gather_beams(s["run_seqs"], src).at[:, :, P + i].set(tok)
        hits = jnp.isin(tok, eos) | (i + 1 >= d.max_new_tokens)

        # Running beams for the next step: the best K candidates that did not just finish.
        run_vals = vals + hits.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_vals, K)[1]
        run_seqs, run_scores = _gather_beams(cand_seqs, nxt), _gather_beams(run_vals, nxt)
        beam_src = _gather_beams(src, nxt)

        # Finished hypotheses: merge the candidates among the top K that just finished.
        did_finish = hits & top_num_beam[None, :]
        fin_vals = vals / ((i + 1).astype(jnp.float32) ** d.length_penalty)
        full = jnp.all(s["finished"], axis=-1, keepdims=True) & es_true
        fin_vals = fin_vals + full.astype(jnp.float32) * NEG
        fin_vals = fin_vals + (~s["heuristic"]).astype(jnp.float32) * NEG
        fin_vals = fin_vals + (~did_finish).astype(jnp.float32) * NEG
        m_scores = jnp.concatenate([s["scores"], fin_vals], axis=1)
        keep = jax.lax.top_k(m_scores, K)[1]
        m_seqs = jnp.concatenate([s["seqs"], cand_seqs], axis=1)
        m_fin = jnp.concatenate([s["finished"], did_finish], axis=1)
        m_len = jnp.concatenate([s["lens"], jnp.full((B, n_keep), i + 1, jnp.int32)], axis=1)
        seqs, scores = _gather_beams(m_seqs, keep), _gather_beams(m_scores, keep)
        finished, lens = _gather_beams(m_fin, keep), _gather_beams(m_len, keep)

        flat_src = (jnp.arange(B)[:, None] * K + beam_src).reshape(-1)
        cache = jax.tree.map(lambda c: c[:, flat_src], s["cache"])

        # transformers' early-stop heuristic: can a running beam still beat the worst finished one?
        cur = i + 1
        best_len = d.max_new_tokens if (d.early_stopping == "never" and d.length_penalty > 0) else cur
        best_possible = run_scores[:, :1] / (jnp.asarray(best_len, jnp.float32) ** d.length_penalty)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        heuristic = s["heuristic"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
        go_on = jnp.any(heuristic) & ~(jnp.all(finished) & es_true) & ~jnp.all(hits)
        return {
            **s,
            "i": cur,
            "cache": cache,
            "run_seqs": run_seqs,
            "run_scores": run_scores,
            "seqs": seqs,
            "scores": scores,
            "finished": finished,
            "lens": lens,
            "heuristic": heuristic,
            "last": run_seqs[:, :, P + i].reshape(-1),
            "done": ~go_on,
            "out": seqs[:, 0],
            "out_len": lens[:, 0],
        }

    run_seqs = jnp.full((B, K, T), fill, jnp.int32).at[:, :, :P].set(ids_bp[:, None, :])
    state = {
        "run_seqs": run_seqs,
        "run_scores": jnp.zeros((B, K), jnp.float32).at[:, 1:].set(NEG),
        "seqs": run_seqs,
        "scores": jnp.full((B, K), NEG, jnp.float32),
        "finished": jnp.zeros((B, K), bool),
        "lens": jnp.zeros((B, K), jnp.int32),
        "heuristic": jnp.ones((B, 1), bool),
    }
    return select, state


_decode = jax.jit(_decode_impl, static_argnums=(0, 1, 2))


# --- public API -------------------------------------------------------------------------------------------


def _as_ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(v) for v in (x if isinstance(x, (list, tuple)) else [x]))


def _check_left_padded(mask: np.ndarray) -> None:
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
        raise ValueError("generate: attention_mask must be a [batch, length] array of 0/1.")
    if not mask[:, -1].all():
        raise ValueError(
            "generate: a prompt ends with padding; pad prompts on the LEFT "
            "(tokenizer.padding_side = 'left', or denselora_jax.decoding.pad_left)."
        )
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("generate: attention_mask has a hole (0 after 1); prompts must be left-padded runs.")


def generate(
    config: ModelConfig,
    params,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    adapter=None,
    adapter_config: AdapterConfig | None = None,
    rng: jax.Array | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> np.ndarray:
    """Prompts [B, P] (left-padded; attention_mask marks real tokens) + their continuations, as
    transformers' `generate` returns them: [B, P + n] where n <= max_new_tokens is the longest generated
    length (decoding stops once every sequence is done); finished sequences are padded with pad_token_id.

    eos_token_id / pad_token_id default to the config's (pass eos_token_id=() for none); the pad id falls
    back to the first EOS id. num_beams > 1 is beam search (with do_sample: beam sampling); length_penalty
    and early_stopping as transformers. rng (a jax key) is required when do_sample.
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"generate: input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, length]."
        )
    _check_left_padded(mask)
    if adapter is not None and adapter_config is None:
        raise ValueError("generate: an adapter was given without its adapter_config.")
    if do_sample and rng is None:
        raise ValueError("generate: do_sample=True needs rng=jax.random.key(seed).")
    eos = _as_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0  # without EOS nothing finishes early, so the pad id is never written
    if num_beams > 1:  # transformers' beam search fills with `pad or eos[0]` (a pad id 0 becomes eos[0])
        pad = pad or (eos[0] if eos else 0)
    d = Decoding(
        max_new_tokens=int(max_new_tokens),
        num_beams=int(num_beams),
        do_sample=bool(do_sample),
        num_eos=max(1, len(eos)),
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
    )
    warp = Sampling(temperature=float(temperature), top_k=top_k, top_p=float(top_p)).arrays()
    key = rng if rng is not None else jax.random.key(0)
    out, lens = _decode(
        config,
        adapter_config if adapter is not None else None,
        d,
        params,
        adapter,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        jnp.asarray(eos or (-1,), jnp.int32),
        jnp.int32(pad),
        warp,
        key,
    )
    out, lens = np.asarray(out), np.asarray(lens)
    return out[:, : ids.shape[1] + int(lens.max())]


def pad_left(token_lists: Sequence[Sequence[int]], pad_id: int, multiple: int = 1):
    """Left-pad token lists to one length (rounded up to `multiple`, so that batches of varied prompts
    share a few compiled shapes). Returns (input_ids, attention_mask) as int32 arrays."""
    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise ValueError("pad_left: every prompt needs at least one token.")
    n = max(len(t) for t in token_lists)
    n = -(-n // multiple) * multiple
    ids = np.full((len(token_lists), n), pad_id, np.int32)
    mask = np.zeros((len(token_lists), n), np.int32)
    for r, t in enumerate(token_lists):
        ids[r, n - len(t) :], mask[r, n - len(t) :] = t, 1
    return ids, mask


# --- CLI --------------------------------------------------------------------------------------------------


def load_checked_adapter(
    config: ModelConfig, params, adapter_dir, *, force: bool = False
) -> tuple[dict, AdapterConfig]:
    """load_adapter(adapter_dir) checked against this base model: its shapes and its fingerprint (an
    adapter trained on another base model is refused with a clear error unless force=True, and even then
    only when the shapes match)."""
    fp = fingerprint(config, params)
    return load_adapter(adapter_dir, model_config=config, base_fingerprint=fp, force=force)
