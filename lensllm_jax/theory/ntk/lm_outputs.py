"""Per-example outputs of a language model whose NTK is taken: `lm_output_fn`."""

from __future__ import annotations

import jax.numpy as jnp

from lensllm_jax.theory.ntk.exact import ApplyFn

LM_OUTPUTS = ("log_likelihood", "nll", "logits", "last_logits")


def lm_output_fn(model, output: str = "log_likelihood") -> ApplyFn:
  """`apply_fn(params, x)` for a `lensllm_jax.models.build(config)`.

  x is input_ids [B, T] or a dict with "input_ids" [B, T] and optionally
  "attention_mask" [B, T] (1 = real token) and "loss_mask" [B, T] (which
  next-token targets count; default: every pair of real tokens).
  An encoder-decoder (``model.config.is_encoder_decoder``) needs the dict
  with "targets" [B, T] too (`textdata.encode_examples(...,
  encoder_decoder=True)`): the encoder reads input_ids, the decoder the
  targets shifted right, and "log_likelihood" is each example's mean target
  log-likelihood over loss_mask (default: every target token).

  Args:
    model: a decoder-only `models.build(config)` module (e.g. `CausalLM`).
    output: "log_likelihood": [B] mean next-token log-likelihood of each
      sequence (`models.sequence_log_likelihood`); "nll": [B] per-example loss
      (its negative: the project's LM loss, `models.mean_token_nll`, of a
      batch of that one sequence); "logits": [B, T, V]; "last_logits": [B, V] at the last
      position (use trace_axes=(-1,) for a traced vocabulary kernel).

  Returns:
    apply_fn(params, x) with the example axis first.
  """
  from lensllm_jax import models  # local: ntk does not need models otherwise

  if output not in LM_OUTPUTS:
    raise ValueError(f"output={output!r}: expected one of {LM_OUTPUTS}")

  if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
    return _seq2seq_output_fn(model, output)

  def apply_fn(params, x):
    if isinstance(x, dict):
      ids, attn, loss_mask = x["input_ids"], x.get("attention_mask"), x.get("loss_mask")
    else:
      ids, attn, loss_mask = x, None, None
    logits = model.apply({"params": params}, ids, attention_mask=attn)
    if output == "logits":
      return logits
    if output == "last_logits":
      return logits[:, -1]
    targets, default_mask = models.next_token_targets(ids, attn)
    mask = default_mask if loss_mask is None else loss_mask
    ll = models.sequence_log_likelihood(logits, targets, mask)
    return ll if output == "log_likelihood" else -ll

  return apply_fn


def _seq2seq_output_fn(model, output: str) -> ApplyFn:
  from lensllm_jax import models  # local: ntk does not need models otherwise

  def apply_fn(params, x):
    if not isinstance(x, dict) or "targets" not in x:
      raise ValueError("an encoder-decoder's NTK input must be a dict with input_ids, "
                       "attention_mask, targets and loss_mask")
    mask = x.get("loss_mask")
    mask = jnp.ones(x["targets"].shape, jnp.float32) if mask is None else mask
    batch = {"input_ids": x["input_ids"], "attention_mask": x.get("attention_mask"),
             "targets": x["targets"], "target_mask": mask}
    logits = models.seq2seq_logits(model, params, batch)
    if output == "logits":
      return logits
    if output == "last_logits":
      return logits[:, -1]
    ll = models.sequence_log_likelihood(logits, x["targets"], mask)
    return ll if output == "log_likelihood" else -ll

  return apply_fn
