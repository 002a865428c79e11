r"""Trains a PFN on prior draws and writes its weights: the single-curve CurvePFN
(lensllm_jax/plus/pfn/, config.kind = "curve") or the ContextPFN
(lensllm_jax/plus/pfn/, config.kind = "context").

  nice -n 19 python -m experiments.train_curve_pfn --config=configs/curve_pfn.py
  nice -n 10 python -m experiments.train_curve_pfn --config=configs/context_pfn.py

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
from lensllm_jax.plus import pfn

FLAGS = flags.FLAGS


def define_flags() -> None:
  common.define_config_file("configs/curve_pfn.py", "configs/curve_pfn.py")


def configs_of(cfg):
  """(model config, TrainConfig) of an ml_collections config (ModelConfig for
  kind "curve", ContextModelConfig for kind "context")."""
  bars = pfn.BarDistribution(**cfg.bars.to_dict())
  model = pfn.ModelConfig(bars=bars, **cfg.model.to_dict())
  if cfg.kind == "context":
    model = pfn.ContextModelConfig(trunk=model, encoder_layers=cfg.encoder_layers)
  elif cfg.kind != "curve":
    raise ValueError(f"config.kind={cfg.kind!r}; expected 'curve' or 'context'")
  return model, pfn.TrainConfig(**cfg.train.to_dict())


def run(cfg):
  model, train = configs_of(cfg)
  t = time.time()
  if cfg.kind == "context":
    predictor, rows = pfn.train_context(model, train, init_from=cfg.init_from or None,
                                        log=logging.info)
  else:
    predictor, rows = pfn.train(model, train, log=logging.info)
  wall = time.time() - t
  extra = {"wall_seconds": round(wall, 1), "machine": platform.machine(), "command": cfg.command}
  if cfg.kind == "context":
    extra["init_from"] = cfg.init_from
  pfn.save_predictor(predictor, cfg.output_dir, train_config=train, extra=extra)
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
