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
  c.k = 10  # top eigenvalues
  c.lanczos_iters = 30  # Lanczos steps for the top-k
  c.hutchinson_probes = 16  # >= 2 (its standard error)
  c.slq_probes = 4
  c.slq_iters = 30  # SLQ Lanczos steps per probe
  c.pac_iters = 12  # Lanczos steps per v^T H^+ v
  c.c = 1.0  # the constant C of the bound
  c.n = config_dict.placeholder(int)  # n of the bound (default: num_examples)
  c.seed = 0  # seed of data, init and probes
  return c
