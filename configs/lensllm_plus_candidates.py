r"""LensLLM+ chosen among candidates under leave-one-dataset-out.

  python -m experiments.lensllm_plus_candidates --config=configs/lensllm_plus_candidates.py

Reported files: flan and gigaword (package data); training-only files: the two
study curve files (as in experiments/lensllm_plus.py). The Pooled candidate's
setting of each fold is read from the 148-setting grid that
experiments/lensllm_plus.py wrote (grid_csv; its inputs.csv must name the same
file contents).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.benchmarks = ["flan", "gigaword"]
  c.train_only = ["results/study/curves_code2name.csv", "results/study/curves_translate.csv"]
  c.data_dir = ""
  c.grid_dir = "results/lensllm_plus"
  c.output_dir = "results/lensllm_plus"
  c.pfn_dir = ""  # empty: the committed CurvePFN (lensllm_jax/data/curve_pfn)
  c.ratios = [8, 16, 32, 64, 128, 256, 512]
  c.seed = 0
  c.num_restarts = 8
  c.num_steps = 60
  c.budget_levels = [0.5, 1.0, 2.0, 4.0]
  return c
