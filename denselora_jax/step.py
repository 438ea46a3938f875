"""The pure training and evaluation steps: loss, optimizer, accumulation, one jit boundary.

Only the adapter tree is differentiated and only it has optimizer state; the frozen base is an input that
is never donated. The loss is the mean cross-entropy over every unmasked token of the whole optimizer
batch, exact however the tokens fall across micro-batches.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.model.config import ModelConfig
from denselora_jax.model.llama import head_weight, hidden_states
from denselora_jax.sharding import with_rules

f32 = jnp.float32
_CE_ROWS = 128  # tokens whose [rows, vocab] logits exist at once in the loss


def _logits(x_nd, w, vocab_major):
    spec = "nd,vd->nv" if vocab_major else "nd,dv->nv"
    return jnp.einsum(spec, x_nd, w.astype(x_nd.dtype), preferred_element_type=f32)


def _chunked(x_nd, targets_n, weights_n):
    """Rows padded (with weight 0) to whole chunks of _CE_ROWS: [chunks, rows, ...]."""
    n = x_nd.shape[0]
    rows = min(_CE_ROWS, n)
    pad = -n % rows

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(a.shape[0] // rows, rows, *a.shape[1:])

    return split(x_nd), split(targets_n), split(weights_n), n


def _chunk_nll(x_nd, w, t_n, wt_n, vocab_major):
    logits_nv = _logits(x_nd, w, vocab_major)
    lse_n = jax.nn.logsumexp(logits_nv, axis=-1)
    tgt_n = jnp.take_along_axis(logits_nv, t_n[:, None], axis=-1)[:, 0]
    return logits_nv, lse_n, jnp.sum((lse_n - tgt_n) * wt_n)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_nll_sum(x_nd, w, targets_n, weights_n, vocab_major):
    """sum_n weights_n * -log softmax(head(x_n))[targets_n], the logits never held for more than _CE_ROWS
    rows at once. Under differentiation the gradient is formed in the same pass (the softmax is at hand),
    so the [N, V] logits are neither stored nor recomputed."""
    xs = _chunked(x_nd, targets_n, weights_n)[:3]

    def body(acc, c):
        return acc + _chunk_nll(*c[:1], w, *c[1:], vocab_major)[2], None

    return jax.lax.scan(body, jnp.zeros((), f32), xs)[0]


def _head_nll_fwd(x_nd, w, targets_n, weights_n, vocab_major):
    x, w_ = x_nd.value, w.value
    x_c, t_c, wt_c, n = _chunked(x, targets_n.value, weights_n.value)
    want_w = w.perturbed

    def body(carry, c):
        acc, dw = carry
        xc, tc, wtc = c
        logits_nv, lse_n, nll = _chunk_nll(xc, w_, tc, wtc, vocab_major)
        p_nv = jnp.exp(logits_nv - lse_n[:, None])
        hit_nv = jax.lax.broadcasted_iota(jnp.int32, p_nv.shape, 1) == tc[:, None]
        g_nv = (jnp.where(hit_nv, p_nv - 1.0, p_nv) * wtc[:, None]).astype(xc.dtype)
        spec = "nv,vd->nd" if vocab_major else "nv,dv->nd"
        dx = jnp.einsum(spec, g_nv, w_.astype(xc.dtype), preferred_element_type=f32).astype(xc.dtype)
        if want_w:
            spec_w = "nv,nd->vd" if vocab_major else "nv,nd->dv"
            dw = dw + jnp.einsum(spec_w, g_nv, xc, preferred_element_type=f32)
        return (acc + nll, dw), dx

    dw0 = jnp.zeros(w_.shape, f32) if want_w else None
    (total, dw), dx_c = jax.lax.scan(body, (jnp.zeros((), f32), dw0), (x_c, t_c, wt_c))
    dx = dx_c.reshape(-1, x.shape[-1])[:n]
    return total, (dx, None if dw is None else dw.astype(w_.dtype))


def _head_nll_bwd(vocab_major, res, ct):
    dx, dw = res
    return (ct * dx).astype(dx.dtype), None if dw is None else (ct * dw).astype(dw.dtype), None, None


head_nll_sum.defvjp(_head_nll_fwd, _head_nll_bwd, symbolic_zeros=True)


def learning_rate_schedule(oc, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then linear decay to 0 at total_steps (HF's linear schedule)."""
    warmup = min(oc.warmup_steps, total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, oc.learning_rate, max(warmup, 1)),
            optax.linear_schedule(oc.learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def make_optimizer(oc, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(oc, total_steps), b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay
    )
    if oc.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(oc.max_grad_norm), adamw)
    return adamw


def loss_sums(mc: ModelConfig, ac: AdapterConfig, adapter, base, batch, rng):
    """(sum of token NLLs, number of target tokens) of one micro-batch [rows, T]."""
    x_btd = hidden_states(
        mc, base, batch["input_ids"], batch["attention_mask"], adapter=adapter, adapter_config=ac, rng=rng
    )
    return hidden_loss_sums(mc, base, x_btd, batch)


def hidden_loss_sums(mc: ModelConfig, base, x_btd, batch):
    """loss_sums from the final hidden states [rows, T, D]: the LM head and the next-token NLL."""
    ids_bt = jnp.asarray(batch["input_ids"], jnp.int32)
    # Position t predicts token t+1; the last position has no target (weight 0).
    targets_bt = jnp.pad(ids_bt[:, 1:], ((0, 0), (0, 1)))
    weights_bt = jnp.pad(jnp.asarray(batch["loss_mask"])[:, 1:].astype(f32), ((0, 0), (0, 1)))
    w, vocab_major = head_weight(mc, base)
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d).astype(mc.dtype)  # the head's matmuls take the compute dtype
    nll = head_nll_sum(x_nd, w, targets_bt.reshape(-1), weights_bt.reshape(-1), vocab_major)
    return nll, jnp.sum(weights_bt)


def train_step(mc, ac, tx, skip_nonfinite, adapter, opt_state, base, batch, rng):
    """One optimizer step over a batch of shape [accum, rows, T]. Returns (adapter, opt_state, metrics)."""
    n_accum = batch["input_ids"].shape[0]

    def micro(carry, xs):
        g_acc, nll_acc, n_acc = carry
        mb, i = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        (nll, n), g = jax.value_and_grad(lambda a: loss_sums(mc, ac, a, base, mb, key), has_aux=True)(adapter)
        return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, adapter)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (g_sum, nll_sum, n_tok), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_accum)))
    denom = jnp.maximum(n_tok, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    loss = nll_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt_state, adapter)
    new_adapter = optax.apply_updates(adapter, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A batch with no target tokens contributes nothing; a non-finite one is skipped only when asked.
    keep_old = n_tok == 0
    if skip_nonfinite:
        keep_old = keep_old | ~finite
    new_adapter, new_opt = jax.tree.map(
        lambda old, new: jnp.where(keep_old, old, new), (adapter, opt_state), (new_adapter, new_opt)
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": n_tok, "finite": finite, "skipped": keep_old}
    return new_adapter, new_opt, metrics


def eval_step(mc, ac, adapter, base, batch):
    """(sum NLL, target tokens) of one evaluation batch [rows, T] without dropout."""
    return loss_sums(mc, ac, adapter, base, batch, None)


def jit_train_step(mc, ac, tx, *, skip_nonfinite, adapter_sh, opt_sh, base_sh, batch_sh, repl):
    """The one jit boundary of training: explicit shardings, adapter and optimizer state donated."""
    return jax.jit(
        with_rules(partial(train_step, mc, ac, tx, skip_nonfinite), repl.mesh),
        in_shardings=(adapter_sh, opt_sh, base_sh, batch_sh, repl),
        out_shardings=(adapter_sh, opt_sh, repl),
        donate_argnums=(0, 1),
    )


def jit_eval_step(mc, ac, *, adapter_sh, base_sh, batch_sh, repl):
    return jax.jit(
        with_rules(partial(eval_step, mc, ac), repl.mesh),
        in_shardings=(adapter_sh, base_sh, batch_sh),
        out_shardings=(repl, repl),
    )
