"""Shared pieces of the Hessian binaries: the LM loss and synthetic token data."""

from __future__ import annotations

import numpy as np

from lensllm_jax.models import mean_token_nll, seq2seq_logits


def lm_loss_fn(model):
  """`loss(params, batch)`: the project's LM loss, the mean NLL per target token.

  `models.losses.mean_token_nll` over the whole batch (the training loss and
  the loss of the study's Hessians). batch: {"input_ids" [B, T], "targets"
  [B, T], "loss_mask" [B, T]} and optionally "attention_mask" [B, T]. For an
  encoder-decoder (``model.config.is_encoder_decoder``) the encoder reads
  input_ids and the decoder the targets shifted right: the NLL is that of the
  target tokens under loss_mask (the sequence-to-sequence loss).
  """
  def loss(params, batch):
    if model.config.is_encoder_decoder:
      logits = seq2seq_logits(model, params, {
          "input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
          "targets": batch["targets"], "target_mask": batch["loss_mask"]})
    else:
      logits = model.apply({"params": params}, batch["input_ids"],
                           attention_mask=batch.get("attention_mask"))
    return mean_token_nll(logits, batch["targets"], batch["loss_mask"])
  return loss


def markov_sequences(vocab_size: int, num: int, length: int, *, chain_seed: int,
                     seed: int) -> dict[str, np.ndarray]:
  """`num` sequences of `length + 1` tokens from a sparse random Markov chain."""
  rng = np.random.default_rng(chain_seed)
  trans = rng.dirichlet(np.full(vocab_size, 0.05), size=vocab_size)
  cum = np.cumsum(trans, axis=1)
  draw = np.random.default_rng(seed)
  seq = np.empty((num, length + 1), np.int64)
  seq[:, 0] = draw.integers(0, vocab_size, num)
  for t in range(length):
    u = draw.random(num)[:, None]
    seq[:, t + 1] = np.minimum((u > cum[seq[:, t]]).sum(axis=1), vocab_size - 1)
  return shifted_token_batch(seq)


def shifted_token_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """[N, T + 1] token ids -> inputs, next-token targets and a full loss mask."""
  tokens = np.asarray(tokens)
  return {"input_ids": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32),
          "loss_mask": np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)}
