r"""The committed CurvePFN (lensllm_jax/data/curve_pfn): model, prior and training.

  nice -n 19 python -m experiments.train_curve_pfn --config=configs/curve_pfn.py

Trains on prior draws only (`pfn.PriorConfig` defaults: ranges fixed
from the laws' meaning, see lensllm_jax/plus/pfn/prior.py), never on a curve file.
The size was set by the time budget (about 15-20 minutes on the 2-core CPU
machine), not by results; the committed run took 1258 s wall (seed 0, 4500
steps, 0.2 s/step, with the two cores shared by other jobs, load ~10-16). `get_config("tiny")` is the seconds-long version
the tests retrain.
"""

import ml_collections


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "curve"  # or "context" (configs/context_pfn.py)
  c.output_dir = "lensllm_jax/data/curve_pfn"
  c.log_dir = "results/curve_pfn"
  c.model = ml_collections.ConfigDict(dict(d_model=64, num_layers=4, num_heads=4, mlp_dim=128))
  c.bars = ml_collections.ConfigDict(dict(z_min=-3.5, z_max=1.0, num_bins=256))
  c.train = ml_collections.ConfigDict(dict(
      seed=0, num_steps=4500, batch_size=128, learning_rate=1e-3, warmup_steps=200,
      weight_decay=1e-4, grad_clip=1.0, drop_prob=0.1, log_every=100))
  c.command = "python -m experiments.train_curve_pfn --config=configs/curve_pfn.py"
  c.overwrite = False  # retrain into directories holding weights of another config
  if preset == "tiny":
    c.output_dir = "runs/curve_pfn_tiny"
    c.log_dir = "runs/curve_pfn_tiny"
    c.model = ml_collections.ConfigDict(dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=64))
    c.bars.num_bins = 64
    c.train.num_steps = 200
    c.train.batch_size = 32
    c.train.learning_rate = 3e-3
    c.train.log_every = 50
  elif preset != "full":
    raise ValueError(f"unknown preset {preset!r}; expected 'full' or 'tiny'")
  return c
