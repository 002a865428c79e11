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

Both directories are locked and keyed on the config and the init_from weights
(`rundir.open_output_dir`, manifest.json): a rerun with the same manifest and
the weights present skips the training, another config is refused naming the
difference (`--config.overwrite=True` retrains, e.g. the packaged weights,
which predate manifests).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import platform
import time

from absl import app, flags, logging

from experiments import common
from lensllm_jax import errors, rundir
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
    raise errors.ConfigError(f"config.kind={cfg.kind!r}; expected 'curve' or 'context'")
  return model, pfn.TrainConfig(**cfg.train.to_dict())


def validate_config(cfg) -> None:
  """Range checks of the config's fields and the init_from weights, before any directory is
  made (`errors.ConfigError` / `errors.CheckpointError` naming the field)."""
  for name in ("train.num_steps", "train.batch_size", "train.log_every", "bars.num_bins",
               "model.d_model", "model.num_layers", "model.num_heads", "model.mlp_dim"):
    common.integer_field(cfg, name, low=1)
  for name in ("train.seed", "train.warmup_steps"):
    common.integer_field(cfg, name, low=0)
  for name in ("train.learning_rate", "train.grad_clip"):
    value = cfg.train[name.split(".")[1]]
    if not 0 < value < math.inf:
      raise errors.ConfigError(f"config.{name}={value}: must be a finite number > 0")
  if not 0 <= cfg.train.drop_prob < 1:
    raise errors.ConfigError(f"config.train.drop_prob={cfg.train.drop_prob}: must be in [0, 1)")
  if not cfg.bars.z_min < cfg.bars.z_max:
    raise errors.ConfigError(f"config.bars: z_min={cfg.bars.z_min} must be below "
                             f"z_max={cfg.bars.z_max}")
  configs_of(cfg)  # the kind
  init = cfg.get("init_from") if cfg.kind == "context" else ""
  if init and not (pathlib.Path(init) / "weights.msgpack").is_file():
    raise errors.CheckpointError(f"config.init_from={init}: no weights.msgpack there (a "
                                 "directory written by train_curve_pfn)")
  if init:  # read before any work: a cut or corrupt weights file names itself
    pfn.load_predictor(init)


WEIGHTS = ("weights.msgpack", "config.json")
LOG = ("train_log.csv",)
# Where the results go and what is written down, not what they are.
MANIFEST_IGNORE = ("output_dir", "log_dir", "command")


@contextlib.contextmanager
def open_dirs(cfg):
  """Locks and binds config.output_dir (weights) and config.log_dir (train_log.csv)."""
  inputs = {"init_from": cfg.init_from} if cfg.kind == "context" and cfg.get("init_from") else {}
  dirs = {pathlib.Path(cfg.output_dir): WEIGHTS}
  log_dir = pathlib.Path(cfg.log_dir)
  dirs[log_dir] = dirs.get(log_dir, ()) + LOG
  with contextlib.ExitStack() as stack:
    for directory, outputs in dirs.items():
      stack.enter_context(rundir.open_output_dir(
          directory, config=cfg, inputs=inputs, outputs=outputs, overwrite=cfg.overwrite,
          ignore=MANIFEST_IGNORE))
    yield


def run(cfg):
  validate_config(cfg)  # refused before any directory is made
  with open_dirs(cfg):
    weights = pathlib.Path(cfg.output_dir)
    if (all((weights / n).is_file() for n in WEIGHTS)
        and (pathlib.Path(cfg.log_dir) / LOG[0]).is_file()):
      logging.info("%s: trained with this config already (manifest.json); skipping", weights)
      return pfn.load_predictor(weights,
                                pfn.ContextPFNPredictor if cfg.kind == "context" else None)
    return _train(cfg)


def _train(cfg):
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
