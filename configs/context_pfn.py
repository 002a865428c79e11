r"""The committed context PFN (lensllm_jax/data/context_pfn): model, prior and training.

  nice -n 10 python -m experiments.train_curve_pfn --config=configs/context_pfn.py

Trains on draws of the hierarchical prior only (`pfn.HierarchyConfig`
defaults, documented in lensllm_jax/plus/pfn/prior.py), never on a curve file.
The trunk starts from the committed single-curve PFN (init_from). Budget,
fixed before any evaluation: batches of 4 files (up to 32 models each, every
model a target), 3000 steps at the single-curve PFN's learning rate, seed 0;
at ~0.3-0.45 s/step on the shared 2-core machine that is the ~25 min budget.
The committed run took 1024 s wall (load average 7-9, other jobs on the two
cores); lensllm_jax/data/context_pfn/config.json records it.
`get_config("tiny")` is the seconds-long version the tests retrain (from
scratch, no init_from).
"""

import ml_collections

from configs import curve_pfn


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
  c = curve_pfn.get_config(preset)   # trunk, bars and optimiser of the single-curve PFN
  tiny = preset == "tiny"
  c.kind = "context"
  c.output_dir = c.log_dir = "runs/context_pfn_tiny" if tiny else "lensllm_jax/data/context_pfn"
  if not tiny:
    c.log_dir = "results/context_pfn"
  # the tiny test model trains from scratch (its trunk differs from the committed PFN's)
  c.init_from = "" if tiny else "lensllm_jax/data/curve_pfn"
  c.encoder_layers = 1 if tiny else 2
  c.train.num_steps = 150 if tiny else 3000
  c.train.batch_size = 2 if tiny else 4
  c.command = "python -m experiments.train_curve_pfn --config=configs/context_pfn.py"
  return c
