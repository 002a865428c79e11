r"""Trains the CurvePFN (lensllm_jax/curve_pfn.py) on prior draws and writes its weights.

  nice -n 19 python -m experiments.train_curve_pfn --config=configs/curve_pfn.py

Writes to config.output_dir: weights.msgpack (flax.serialization) and
config.json (model, prior, training config and seed, wall time); to
config.log_dir: train_log.csv (step, mean NLL of the hidden points since the
previous row, seconds). Reproducible from the seed (CPU float32; another
backend may differ in the last bits).
"""

from __future__ import annotations

import pathlib
import platform
import time

from absl import app, flags, logging

from experiments import common
from lensllm_jax import curve_pfn

FLAGS = flags.FLAGS


def define_flags() -> None:
  common.define_config_file("configs/curve_pfn.py", "configs/curve_pfn.py")


def configs_of(cfg):
  """(ModelConfig, TrainConfig) of an ml_collections config."""
  bars = curve_pfn.BarDistribution(**cfg.bars.to_dict())
  model = curve_pfn.ModelConfig(bars=bars, **cfg.model.to_dict())
  return model, curve_pfn.TrainConfig(**cfg.train.to_dict())


def run(cfg) -> curve_pfn.CurvePFNPredictor:
  model, train = configs_of(cfg)
  t = time.time()
  predictor, rows = curve_pfn.train(model, train, log=logging.info)
  wall = time.time() - t
  curve_pfn.save_predictor(predictor, cfg.output_dir, train_config=train,
                           extra={"wall_seconds": round(wall, 1), "machine": platform.machine(),
                                  "command": "python -m experiments.train_curve_pfn "
                                             "--config=configs/curve_pfn.py"})
  log = pathlib.Path(cfg.log_dir) / "train_log.csv"
  log.parent.mkdir(parents=True, exist_ok=True)
  if log.exists():
    log.unlink()
  common.append_rows(log, ("step", "nll", "seconds"), rows)
  logging.info("trained %d steps in %.0fs -> %s", train.num_steps, wall, cfg.output_dir)
  return predictor


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(FLAGS.config)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
