r"""NTK eigenvalue spectrum and F(t) of a causal LM on a probe set (experiments.ntk_spectrum).

  python -m experiments.ntk_spectrum --config=configs/ntk_spectrum.py --workdir=/tmp/ntk \
      [--config.preset=tiny-llama] [--config.ntk.kernel=sketched --config.ntk.sketch_dim=4096]

The default is a seeded tiny-gpt2 on 128 random probe sequences (seconds on a
CPU); set hf_checkpoint (a Hugging Face directory) or checkpoint (orbax
params of `training.save_params`, with the preset's shape) for a real model.
"""

import ml_collections
from ml_collections import config_dict

from lensllm_jax.theory import ntk


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/ntk_spectrum.py takes no argument, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.preset = "tiny-gpt2"  # model preset (lensllm_jax.models.presets)
  c.checkpoint = config_dict.placeholder(str)  # orbax params of training.save_params (preset's shape)
  c.hf_checkpoint = config_dict.placeholder(str)  # Hugging Face directory (overrides preset)
  c.seed = 0  # seed of the random init and of the random probe set
  c.probe = config_dict.placeholder(str)  # .npy of int token ids [n, T]; default random
  c.n = 128  # random probe sequences (ignored with probe)
  c.seq_len = 16  # tokens per random probe sequence
  # The kernel, as the sweeps' `ntk` block (configs/finetune_tiny.py): kernel "exact"
  # (blocked empirical NTK, `implementation` one of ntk.IMPLEMENTATIONS) or "sketched"
  # (ntk.make_sketched_ntk_fn: unbiased, memory O(n k + block), for LLM-sized models;
  # sketch one of ntk.SKETCHES, sketch_dim directions k); block_size examples per kernel
  # block; output the per-sequence scalar whose NTK is taken (log_likelihood | nll);
  # blocks the parameter blocks (path prefixes) to include (empty: all parameters).
  c.ntk = ml_collections.ConfigDict(dict(
      kernel="exact", output="log_likelihood", blocks=(),
      implementation=ntk.DEFAULT_IMPLEMENTATION, block_size=64, sketch="countsketch",
      sketch_dim=4096))
  c.target = 0.0  # regression target Y of the output (r0 = f0 - Y)
  c.eta = 1e-3  # learning rate eta of the linearised gradient flow
  # The t grid of F(t): `points` log-spaced plus t = 0, over range = (t_min, t_max);
  # empty range: from the spectrum, [1e-2 / (eta lambda_max), 5 / (eta lambda_min)].
  c.t_grid = ml_collections.ConfigDict(dict(points=200, range=()))
  # A rerun into a workdir whose manifest (config, input sha256s, version) differs is refused;
  # True deletes the workdir's results and recomputes them (lensllm_jax/rundir.py).
  c.overwrite = False
  return c
