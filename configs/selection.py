r"""The model-selection tables of Lin et al. (2024) / Zeng et al. (2025) on the public curves.

  python -m experiments.reproduce_selection --config=configs/selection.py \
      --output_dir=results/selection [--config.num_restarts=4] [--config.figures=False]

`get_config()` is the paper protocol: both packaged curve files (flan,
gigaword), the seven published methods, the seven budget ratios
D*/D_max = 8 ... 512 of the papers, D* = the largest D of each file, and the
budgeted early-stopping procedure at z = 0.5, 1, 2, 4 (about 15-20 s on 2 CPU
cores). `get_config("plus")` adds LensLLM+, the candidate chosen by
leave-one-dataset-out (`plus.candidates.leave_one_out`, several minutes more);
`--config.methods` may also name PooledLensLLM, the pooled fit alone
(`pooled.DEFAULT_CONFIG`, untuned).

Tuple fields are overridden as Python literals, e.g.
`--config.methods="('ZeroShot','AtS')"`, `--config.ratios="(8,16)"`,
`--config.benchmarks="('flan','path/to/wmt19.csv')"`.
"""

import ml_collections
from ml_collections import config_dict

from lensllm_jax.selection import methods, published

# The seven published methods, in the order of the tables (`methods.REGISTRY`).
PUBLISHED_METHODS = methods.PUBLISHED_METHODS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Curve files: names (packaged, else data_dir / $LENSLLM_DATA_DIR, else downloaded) or paths.
  c.benchmarks = ("flan", "gigaword")
  c.data_dir = config_dict.placeholder(str)
  c.methods = PUBLISHED_METHODS
  c.ratios = tuple(published.RATIOS)  # D*/D_max of the published tables
  c.target_data_num = config_dict.placeholder(int)  # D*; default the largest D of each file
  c.num_restarts = 8  # random restarts per fitted curve
  c.max_steps = 500  # damped-Newton steps per restart (fitting.fit_curves)
  c.seed = 0
  # Methods of a file computed at once (0: os.cpu_count()); results do not depend on it. 1:
  # with 2 threads on 2 cores XLA:CPU executions deadlocked (docs/development.md, known issues).
  c.threads = 1
  # Budgeted early stopping (budgeted.budgeted_selection); enabled=False skips it.
  c.budget = ml_collections.ConfigDict()
  c.budget.enabled = True
  c.budget.levels = (0.5, 1.0, 2.0, 4.0)  # confidence levels z (normal quantiles)
  c.budget.method = "LensLLM"  # the law used by the budgeted procedure (a budgeted Method)
  c.budget.max_data_num = config_dict.placeholder(int)  # default D* / min(ratios)
  c.figures = True
  # A rerun into an output directory whose manifest (config, input sha256s, version) differs
  # is refused; True deletes the directory's results and recomputes them (lensllm_jax/rundir.py).
  c.overwrite = False
  if arg == "plus":
    # LensLLM+: the candidate of plus.candidates chosen for each file on the other files (needs
    # >= 2 files; the recommended predictor, as in experiments.lensllm_plus).
    c.methods = PUBLISHED_METHODS + ("LensLLM+",)
  elif arg:
    raise ValueError(f"configs/selection.py: unknown argument {arg!r} (expected '' or 'plus')")
  return c
