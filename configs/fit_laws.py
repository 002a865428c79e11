r"""Fits the fine-tuning laws to curve files (experiments.fit_laws).

  python -m experiments.fit_laws --config=configs/fit_laws.py --output_dir=results/fit_laws \
      [--config.max_data_size=204800]

Every law of `laws` is fitted to every model's curve of every file of
`benchmarks` (`fitting.fit_curves`); about a minute on 2 CPU cores (mostly one
compilation per law).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/fit_laws.py takes no argument, got {arg!r}")
  c = ml_collections.ConfigDict()
  # Names (packaged, else data_dir / $LENSLLM_DATA_DIR, else downloaded) or paths.
  c.benchmarks = ("flan", "gigaword")
  c.data_dir = config_dict.placeholder(str)
  c.laws = ("vanilla", "rectified", "lensllm")  # laws.get_law names
  c.num_restarts = 8
  # Fit only D <= max_data_size (plus D = 0) and report held-out RMSE on larger D;
  # None: fit every point.
  c.max_data_size = config_dict.placeholder(float)
  c.plot_models = 6  # models drawn in the PNG
  c.seed = 0  # PRNG seed of the restarts
  # A rerun into an output directory whose manifest (config, input sha256s, version) differs
  # is refused; True deletes the directory's results and recomputes them (lensllm_jax/rundir.py).
  c.overwrite = False
  return c
