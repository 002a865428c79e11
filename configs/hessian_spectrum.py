r"""Hessian spectrum and per-layer PAC-Bayes quantities (experiments.hessian_spectrum).

  python -m experiments.hessian_spectrum --config=configs/hessian_spectrum.py \
      --workdir=results/hessian_spectrum [--config.preset=tiny-llama]

The defaults are the self-contained demo (seeded tiny-gpt2 pre-trained and
fine-tuned here on two Markov chains); set pretrained_ckpt and finetuned_ckpt
(training.save_params directories), model_config and tokens_npy for a real
model. About 1-2
min on 2 CPU cores (mostly compilation).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/hessian_spectrum.py takes no argument, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.preset = "tiny-gpt2"  # model preset (lensllm_jax.models.presets)
  # JSON of ModelConfig or EncoderDecoderConfig fields (experiments.finetune_sweep writes
  # models/<model>.json); replaces the preset (shape and vocabulary of the checkpoints)
  c.model_config = config_dict.placeholder(str)
  c.pretrained_ckpt = config_dict.placeholder(str)  # training.save_params directory
  c.finetuned_ckpt = config_dict.placeholder(str)  # training.save_params directory
  # task token ids (.npy): [N, T + 1] (decoder-only), [N, 2 T] (encoder-decoder: T in, T out)
  c.tokens_npy = config_dict.placeholder(str)
  c.num_examples = 16  # training sequences n
  c.seq_len = 32  # sequence length T
  c.batch_size = 8  # sequences per streamed batch
  c.pretrain_steps = 100  # demo pre-training steps
  c.finetune_steps = 50  # demo fine-tuning steps
  c.learning_rate = 3e-3  # Adam learning rate of the demo training
  # Top-k eigenvalues by Lanczos (`hessian.lanczos_eigs`): k <= iters.
  c.lanczos = ml_collections.ConfigDict(dict(k=10, iters=30))
  # Hutchinson trace (`hessian.hutchinson_trace`): probes >= 2 (its standard error).
  c.hutchinson = ml_collections.ConfigDict(dict(probes=16))
  # SLQ spectral density (`hessian.slq_density`): probes, Lanczos steps per probe.
  c.slq = ml_collections.ConfigDict(dict(probes=4, iters=30))
  # Per-layer PAC-Bayes table and bound sum_i sqrt(C H_i / n) (`pac_bayes.layer_table`):
  # iters Lanczos steps per v^T H^+ v, the constant c = C, n (default: num_examples).
  c.pac_bayes = ml_collections.ConfigDict(dict(iters=12, c=1.0))
  c.pac_bayes.n = config_dict.placeholder(int)
  c.seed = 0  # seed of data, init and probes
  return c
