"""Token-level losses and log-likelihoods of a causal LM.

Convention: logits[b, t] is the prediction for targets[b, t]; with the raw
model outputs, targets[b, t] = input_ids[b, t + 1] (see `next_token_targets`).
loss_mask[b, t] is 1 where targets[b, t] counts (target tokens only for
input -> target tasks, real tokens only under padding).

THE LM loss of the project (training objective, validation / test loss of a
curve, the loss whose Hessian the Hessian binaries and the study analyse) is
the mean NLL per target token over the batch, `mean_token_nll`:

    L = sum_{b,t} m_bt (-log p(targets_bt)) / sum_{b,t} m_bt,

computed from `token_nll_sums` (numerator, denominator), so that sums over
micro-batches or eval batches divide once. It is NOT the mean over sequences
of per-sequence means (`token_nll`), which weighs a short sequence's tokens
more. Per-example quantities (the NTK outputs of `ntk.lm_output_fn`, the
PAC-Bayes maxima over single examples) are the same definition applied to a
batch of one sequence: `token_nll` per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(input_ids: jax.Array,
                       attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Shifts ids left by one: targets[:, t] = input_ids[:, t + 1].

  Args:
    input_ids: [B, T] ints.
    attention_mask: [B, T] (1 = real token) or None.

  Returns:
    targets [B, T] int32 (last column 0) and loss_mask [B, T] float32,
    1 where both position t and t + 1 are real tokens (last column 0).
  """
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  real = attention_mask.astype(jnp.float32)
  mask = jnp.concatenate([real[:, :-1] * real[:, 1:], jnp.zeros_like(real[:, :1])], axis=1)
  return targets.astype(jnp.int32), mask


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets[b, t] | context) = log_softmax(logits)[b, t, targets[b, t]].

  Args:
    logits: [B, T, V].
    targets: [B, T] ints in [0, V).

  Returns:
    [B, T] float32.

  Computed as logits[b, t, targets] - logsumexp_v logits[b, t, v], the target
  logit gathered (B T values; a masked sum over the vocabulary was a [B, T, V]
  pass), with a JVP written as that masked sum: the gradient is then
  softmax - one_hot, elementwise and fused, instead of a scatter into a
  [B, T, V] array of zeros (the costliest op of a CPU backward pass at a
  large vocabulary), and no [B, T, V] log-softmax is kept.
  """
  logits = logits.astype(jnp.float32)
  return _target_logit(logits, targets.astype(jnp.int32)) - jax.nn.logsumexp(logits, axis=-1)


@jax.custom_jvp
def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits[b, t, targets[b, t]], [B, T]: a gather of B T values (no [B, T, V] pass);
  0 where a target is outside [0, V), like the masked sum of the JVP."""
  vocab = logits.shape[-1]
  picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, vocab - 1)[..., None], axis=-1)
  return jnp.where((targets >= 0) & (targets < vocab), picked[..., 0], 0.0)


@_target_logit.defjvp
def _target_logit_jvp(primals, tangents):
  # The tangent as a masked sum over the vocabulary, so that its transpose (the
  # gradient) is the elementwise one_hot * cotangent, fused into d logits, not a scatter.
  logits, targets = primals
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  picked = jnp.sum(jnp.where(vocab == targets[..., None], tangents[0], 0.0), axis=-1)
  return _target_logit(logits, targets), picked


def token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Masked mean negative log-likelihood per sequence.

  nll[b] = -sum_t m[b,t] log p(targets[b,t]) / max(sum_t m[b,t], 1)
  (0 for a sequence with no counted token).

  Args:
    logits: [B, T, V].
    targets: [B, T] ints.
    loss_mask: [B, T] (1 = counted).

  Returns:
    [B] float32.
  """
  mask = loss_mask.astype(jnp.float32)
  total = -jnp.sum(token_log_probs(logits, targets) * mask, axis=-1)
  return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def sequence_log_likelihood(logits: jax.Array, targets: jax.Array,
                            loss_mask: jax.Array) -> jax.Array:
  """Per-sequence mean log-likelihood, -token_nll: [B] float32 (a scalar output per example)."""
  return -token_nll(logits, targets, loss_mask)


def token_nll_sums(logits: jax.Array, targets: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_{b,t} m[b,t] (-log p(targets[b,t])), sum_{b,t} m[b,t]): float32 scalars.

  Args:
    logits: [B, T, V]; targets: [B, T] ints; loss_mask: [B, T] (1 = counted).
  """
  mask = loss_mask.astype(jnp.float32)
  return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)


def mean_token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """THE LM loss (module docstring): mean NLL per counted token of the batch, scalar float32.

  sum_{b,t} m[b,t] (-log p) / max(sum_{b,t} m[b,t], 1). Unlike the mean of
  `token_nll`, long sequences weigh more.
  """
  total, count = token_nll_sums(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0)
