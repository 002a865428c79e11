"""Synthetic curves shared by the selection tests (helper module, not a test file)."""

import numpy as np

from lensllm_jax.curves import benchmarks
from lensllm_jax.laws import fitting

# Small fits shared by every fitted test (same shapes -> one compilation per law).
FAST = dict(num_restarts=2, fit_options=fitting.FitOptions(max_steps=150))


def synthetic_curves(num_models=7, seed=0, noise=0.0, grid_max=409600):
  """Rectified-law curves B / (D_l + D^beta) + E with known parameters."""
  rng = np.random.default_rng(seed)
  d = np.concatenate([[0.0], 200.0 * 2.0 ** np.arange(int(np.log2(grid_max / 200)) + 1)])
  b = rng.uniform(2.0, 20.0, num_models)
  dl = rng.uniform(0.5, 5.0, num_models)
  beta = rng.uniform(0.2, 0.45, num_models)
  e = rng.uniform(0.5, 2.0, num_models)
  losses = b[:, None] / (dl[:, None] + np.where(d > 0, d, 1e-10)[None] ** beta[:, None]) + e[:, None]
  losses *= np.exp(noise * rng.standard_normal(losses.shape))
  curves = benchmarks.CurveSet(
      name="synthetic", source="<synthetic>", models=tuple(f"m{i}" for i in range(num_models)),
      sizes=(10 ** rng.uniform(7, 9.5, num_models)).astype(np.int64),
      families=("fam",) * num_models, data_sizes=d, losses=losses)
  return curves, dict(B=b, D_l=dl, beta=beta, E=e)
