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


def markov_tokens(vocab_size: int, num: int, length: int, *, chain_seed: int,
                  seed: int) -> np.ndarray:
  """[num, length] int64 token ids from a sparse random Markov chain (`chain_seed`)."""
  rng = np.random.default_rng(chain_seed)
  trans = rng.dirichlet(np.full(vocab_size, 0.05), size=vocab_size)
  cum = np.cumsum(trans, axis=1)
  draw = np.random.default_rng(seed)
  seq = np.empty((num, length), np.int64)
  seq[:, 0] = draw.integers(0, vocab_size, num)
  for t in range(length - 1):
    u = draw.random(num)[:, None]
    seq[:, t + 1] = np.minimum((u > cum[seq[:, t]]).sum(axis=1), vocab_size - 1)
  return seq


def markov_sequences(vocab_size: int, num: int, length: int, *, chain_seed: int,
                     seed: int) -> dict[str, np.ndarray]:
  """`num` sequences of `length + 1` Markov-chain tokens as a `shifted_token_batch`."""
  return shifted_token_batch(markov_tokens(vocab_size, num, length + 1, chain_seed=chain_seed,
                                           seed=seed))


def shifted_token_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """[N, T + 1] token ids -> inputs, next-token targets and a full loss mask."""
  tokens = np.asarray(tokens)
  return {"input_ids": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32),
          "loss_mask": np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)}


def seq2seq_token_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """[N, 2 T] token ids -> an encoder-decoder batch: the encoder reads the first T
  tokens (input_ids), the decoder predicts the last T (targets, full loss mask)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] % 2:
    raise ValueError(f"seq2seq_token_batch: need [N, 2 T] token ids, got shape {tokens.shape}")
  t = tokens.shape[1] // 2
  return {"input_ids": tokens[:, :t].astype(np.int32),
          "targets": tokens[:, t:].astype(np.int32),
          "loss_mask": np.ones((tokens.shape[0], t), np.float32)}


def example_length(seq_len: int, encoder_decoder: bool) -> int:
  """Tokens per example of `token_batch`: T + 1 (decoder-only), 2 T (encoder-decoder)."""
  return 2 * seq_len if encoder_decoder else seq_len + 1


def token_batch(tokens: np.ndarray, encoder_decoder: bool) -> dict[str, np.ndarray]:
  """The LM batch of `lm_loss_fn` from [N, example_length(T, encoder_decoder)] token ids:
  `seq2seq_token_batch` for an encoder-decoder, else `shifted_token_batch`."""
  return seq2seq_token_batch(tokens) if encoder_decoder else shifted_token_batch(tokens)
