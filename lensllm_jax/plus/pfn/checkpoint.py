"""PFN checkpoints: `save_predictor`, `load_predictor` and the packaged weights
(lensllm_jax/data/curve_pfn, lensllm_jax/data/context_pfn).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp

from lensllm_jax import errors
from lensllm_jax.plus.pfn.predictor import ContextPFNPredictor, CurvePFNPredictor


def save_predictor(predictor: CurvePFNPredictor, directory, *, train_config,
                   extra: dict | None = None) -> pathlib.Path:
  """Writes weights.msgpack and config.json (model, prior, training config) to directory.

  train_config: the `training.TrainConfig` it was trained with (a dataclass).
  """
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  (out / "weights.msgpack").write_bytes(flax.serialization.to_bytes(predictor.params))
  mc = dataclasses.asdict(predictor.model_config)
  cfg = {"model": mc, "prior": dataclasses.asdict(predictor.prior),
         "train": dataclasses.asdict(train_config), **(extra or {})}
  (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
  return out


def dataclass_from_dict(cls, values: dict):
  """A (frozen) dataclass from its `dataclasses.asdict` form (JSON lists -> tuples,
  nested dataclass fields rebuilt)."""
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    v = values[f.name]
    default = f.default if f.default is not dataclasses.MISSING else None
    if dataclasses.is_dataclass(default):
      v = dataclass_from_dict(type(default), v)
    elif isinstance(v, list):
      v = tuple(v)
    kwargs[f.name] = v
  return cls(**kwargs)


def load_predictor(directory, predictor_cls=None):
  """Reads a predictor written by `save_predictor` (default class CurvePFNPredictor;
  the class names its config types as `model_config_cls` and `prior_cls`)."""
  cls = CurvePFNPredictor if predictor_cls is None else predictor_cls
  src = pathlib.Path(directory)
  for name in ("weights.msgpack", "config.json"):
    if not (src / name).is_file():
      raise errors.CheckpointError(f"load_predictor: {src / name} is missing")
  try:
    cfg = json.loads((src / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.CheckpointError(f"{src / 'config.json'}: not valid JSON ({e})") from None
  model_config = dataclass_from_dict(cls.model_config_cls, cfg["model"])
  prior = dataclass_from_dict(cls.prior_cls, cfg["prior"])
  # The state dict needs no template (no model.init): nested dicts of arrays.
  weights = src / "weights.msgpack"
  try:  # msgpack: ValueError for a cut file or extra data
    params = flax.serialization.msgpack_restore(weights.read_bytes())
  except ValueError as e:
    raise errors.CheckpointError(f"{weights}: not a readable weights file ({e})") from None
  if not isinstance(params, dict):
    raise errors.CheckpointError(f"{weights}: not a weights file (no dict of arrays)")
  return cls(model_config, jax.tree.map(jnp.asarray, params), prior)


CURVE_PFN_WEIGHTS = pathlib.Path(__file__).resolve().parents[2] / "data" / "curve_pfn"


def default_curve_predictor() -> CurvePFNPredictor:
  """The committed PFN (lensllm_jax/data/curve_pfn, made by experiments/train_curve_pfn.py)."""
  return load_predictor(CURVE_PFN_WEIGHTS)


CONTEXT_PFN_WEIGHTS = pathlib.Path(__file__).resolve().parents[2] / "data" / "context_pfn"


@functools.cache
def default_context_predictor() -> ContextPFNPredictor:
  """The committed context PFN (lensllm_jax/data/context_pfn, made by
  `experiments.train_curve_pfn --config=configs/context_pfn.py`); loaded once."""
  return load_predictor(CONTEXT_PFN_WEIGHTS, ContextPFNPredictor)
