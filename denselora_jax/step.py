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
from denselora_jax.model.llama import forward


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
    logits_btv = forward(
        mc, base, batch["input_ids"], batch["attention_mask"], adapter=adapter, adapter_config=ac, rng=rng
    )
    targets_bt = batch["input_ids"][:, 1:]
    weights_bt = batch["loss_mask"][:, 1:].astype(jnp.float32)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_bt * weights_bt), jnp.sum(weights_bt)


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
        partial(train_step, mc, ac, tx, skip_nonfinite),
        in_shardings=(adapter_sh, opt_sh, base_sh, batch_sh, repl),
        out_shardings=(adapter_sh, opt_sh, repl),
        donate_argnums=(0, 1),
    )


def jit_eval_step(mc, ac, *, adapter_sh, base_sh, batch_sh, repl):
    return jax.jit(
        partial(eval_step, mc, ac), in_shardings=(adapter_sh, base_sh, batch_sh), out_shardings=(repl, repl)
    )
