r"""NTK eigenvalue spectrum and the NTK test loss F(t) of a causal LM on a probe set.

Steps: build the model (a preset with seeded random init, an orbax
checkpoint from `training.save_params`, or a Hugging Face checkpoint
directory) -> probe set (random token sequences from config.seed, or an .npy of
token ids [n, T]) -> blocked empirical NTK of the per-sequence output
(default: mean next-token log-likelihood) w.r.t. the chosen parameter blocks
-> float64 eigendecomposition -> F(t) = sum_k exp(-2 eta lambda_k t) proj_k^2
on a grid of t, with r0 = f_0(X) - target (target 0: the output's residual
from a perfect fit).

Writes to --workdir:
  manifest.json   the config and the sha256 of its input files (lensllm_jax/rundir.py:
                  a rerun with others is refused unless config.overwrite; one run at a time)
  meta.json       the settings and shapes
  kernel.npy      Theta [n, n] float32 (reused on rerun when meta.json matches)
  residual.npy    r0 [n]
  spectrum.csv    k, eigenvalue (descending), proj = u_k^T r0, proj^2
  f_t.csv         t, F(t), F(t) / F(0)
  ntk_spectrum.png  eigenvalues (log scale) and F(t) (log t)

  python -m experiments.ntk_spectrum --workdir=/tmp/ntk config.preset=tiny-gpt2 config.n=128
  python -m experiments.ntk_spectrum --workdir=/tmp/ntk config.preset=gpt2-124m config.n=256 \
      config.ntk=sketched config.sketch_dim=4096     # unbiased sketch, memory O(n k + block)
  python -m experiments.ntk_spectrum --workdir=/tmp/ntk config.preset=tiny-llama \
      config.checkpoint=/path/to/orbax_params config.blocks=layers_1,lm_head
"""

from __future__ import annotations

import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common, reporting  # common also defines --compilation_cache_dir
from lensllm_jax import models, rundir
from lensllm_jax.theory import ntk

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
FLAGS = flags.FLAGS
common.define_config_file("configs/ntk_spectrum.py", "Configuration (configs/ntk_spectrum.py).")


def load_model():
  """(config, model, params) from the flags."""
  if FLAGS.config.hf_checkpoint:
    config, params = models.load_hf_checkpoint(FLAGS.config.hf_checkpoint)
    return config, models.build(config), params
  if FLAGS.config.preset not in models.presets:
    raise app.UsageError(f"config.preset={FLAGS.config.preset!r}: not one of {sorted(models.presets)}")
  config = models.presets[FLAGS.config.preset]
  params = models.init_params(config, jax.random.key(FLAGS.config.seed))
  if FLAGS.config.checkpoint:
    from lensllm_jax import training
    if not os.path.exists(FLAGS.config.checkpoint):
      raise app.UsageError(f"config.checkpoint={FLAGS.config.checkpoint}: no such path")
    params = training.load_params(FLAGS.config.checkpoint, like=params)
  return config, models.build(config), params


def load_probe(config) -> np.ndarray:
  """Token ids [n, T] int32."""
  if FLAGS.config.probe:
    ids = np.load(FLAGS.config.probe)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise app.UsageError(f"config.probe={FLAGS.config.probe}: expected int token ids [n, T], "
                           f"got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
      raise app.UsageError(f"config.probe={FLAGS.config.probe}: ids outside [0, {config.vocab_size})")
    if ids.shape[1] > config.max_len:
      raise app.UsageError(f"config.probe={FLAGS.config.probe}: length {ids.shape[1]} > max_len "
                           f"{config.max_len}")
    return ids.astype(np.int32)
  rng = np.random.default_rng(FLAGS.config.seed + 1)
  return rng.integers(0, config.vocab_size, (FLAGS.config.n, FLAGS.config.seq_len), dtype=np.int32)


def compute_kernel(model, params, ids, meta):
  """Blocked NTK [n, n]; reuses kernel.npy when meta.json matches."""
  kernel_path = os.path.join(_WORKDIR.value, "kernel.npy")
  meta_path = os.path.join(_WORKDIR.value, "meta.json")
  if os.path.exists(kernel_path) and os.path.exists(meta_path):
    with open(meta_path) as fh:
      if json.load(fh) == meta:
        logging.info("reusing %s", kernel_path)
        return np.load(kernel_path)
  apply_fn = ntk.lm_output_fn(model, FLAGS.config.output)
  mask = ntk.param_mask_from_names(params, FLAGS.config.blocks) if FLAGS.config.blocks else None
  start = time.perf_counter()

  def progress(done, total):
    rate = done / (time.perf_counter() - start)
    logging.info("kernel blocks %d/%d (%.2f block pairs/s)", done, total, rate)

  if FLAGS.config.ntk == "sketched":  # key: config.seed, so a rerun gives the same sketch
    fn = ntk.make_sketched_ntk_fn(apply_fn, sketch_dim=FLAGS.config.sketch_dim,
                                  key=jax.random.fold_in(jax.random.key(FLAGS.config.seed), 1),
                                  param_mask=mask, sketch=FLAGS.config.sketch,
                                  block_size=FLAGS.config.block_size)
  else:
    fn = ntk.make_blocked_ntk_fn(
        ntk.make_ntk_fn(apply_fn, param_mask=mask, implementation=FLAGS.config.implementation),
        block_size=FLAGS.config.block_size, pairs_per_call=4, progress=progress)
  theta = np.asarray(jax.device_get(fn(params, jnp.asarray(ids))), np.float32)
  logging.info("kernel %s in %.1fs", theta.shape, time.perf_counter() - start)
  np.save(kernel_path, theta)
  with open(meta_path, "w") as fh:
    json.dump(meta, fh, indent=1)
  return theta


def t_grid(eigvals: np.ndarray) -> np.ndarray:
  if FLAGS.config.t_range:
    if len(FLAGS.config.t_range) != 2:
      raise app.UsageError(f"config.t_range={FLAGS.config.t_range}: expected t_min,t_max")
    lo, hi = (float(v) for v in FLAGS.config.t_range)
  else:
    positive = eigvals[eigvals > 0]
    if positive.size == 0:
      raise ValueError("kernel has no positive eigenvalue: F(t) is constant")
    # From 1 % of the fastest mode's time scale until the slowest mode (floored
    # at 1e-6 lambda_max) has decayed by exp(-10).
    lo = 1e-2 / (FLAGS.config.eta * positive.max())
    hi = 5.0 / (FLAGS.config.eta * max(positive.min(), 1e-6 * positive.max()))
  return np.concatenate([[0.0], np.geomspace(lo, hi, FLAGS.config.num_t)])


def write_csv(path, header, rows):
  with open(path, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(header)
    writer.writerows(rows)


def main(argv):
  del argv
  cfg = FLAGS.config
  for name, allowed in (("output", ("log_likelihood", "nll")), ("ntk", ("exact", "sketched")),
                        ("implementation", tuple(ntk.IMPLEMENTATIONS)),
                        ("sketch", tuple(ntk.SKETCHES))):
    if cfg[name] not in allowed:
      raise app.UsageError(f"config.{name}={cfg[name]!r}: expected one of {list(allowed)}")
  inputs = {name: cfg[name] for name in ("checkpoint", "hf_checkpoint", "probe") if cfg[name]}
  with rundir.open_output_dir(_WORKDIR.value, config=cfg, inputs=inputs,
                              outputs=("*.npy", "*.json", "*.csv", "*.png"),
                              overwrite=cfg.overwrite):
    run()


def run() -> None:
  """The kernel, its spectrum and F(t) into --workdir (locked and bound by `main`)."""
  config, model, params = load_model()
  ids = load_probe(config)
  meta = dict(preset=FLAGS.config.preset, checkpoint=FLAGS.config.checkpoint,
              hf_checkpoint=FLAGS.config.hf_checkpoint, seed=FLAGS.config.seed, probe=FLAGS.config.probe,
              probe_shape=list(ids.shape), output=FLAGS.config.output, blocks=list(FLAGS.config.blocks),
              implementation=FLAGS.config.implementation, num_params=models.count_params(params),
              ntk=FLAGS.config.ntk, **({"sketch_dim": FLAGS.config.sketch_dim, "sketch": FLAGS.config.sketch}
                                 if FLAGS.config.ntk == "sketched" else {}))
  logging.info("model %s, %d params; probe %s", config.arch, meta["num_params"], ids.shape)
  theta = compute_kernel(model, params, ids, meta)
  f0 = np.asarray(ntk.lm_output_fn(model, FLAGS.config.output)(params, jnp.asarray(ids)), np.float64)
  r0 = f0 - FLAGS.config.target
  np.save(os.path.join(_WORKDIR.value, "residual.npy"), r0)

  spec = ntk.ntk_spectrum(theta, r0)
  order = np.argsort(np.asarray(spec.eigvals))[::-1]
  eigvals, proj = np.asarray(spec.eigvals)[order], np.asarray(spec.proj)[order]
  write_csv(os.path.join(_WORKDIR.value, "spectrum.csv"), ["k", "eigenvalue", "proj", "proj_sq"],
            [(k, lam, p, p * p) for k, (lam, p) in enumerate(zip(eigvals, proj, strict=True))])

  ts = t_grid(eigvals)
  with jax.enable_x64(True):
    f = np.asarray(ntk.ntk_test_loss(jnp.asarray(eigvals), jnp.asarray(proj), FLAGS.config.eta,
                                     jnp.asarray(ts)))
  write_csv(os.path.join(_WORKDIR.value, "f_t.csv"), ["t", "F", "F_over_F0"],
            [(t, v, v / f[0]) for t, v in zip(ts, f, strict=True)])
  png = os.path.join(_WORKDIR.value, "ntk_spectrum.png")
  reporting.ntk_spectrum_figure(eigvals, ts, f, FLAGS.config.eta, png)
  logging.info("lambda_max %.4g, lambda_min %.4g, trace %.4g; F(0) %.4g -> F(t_max) %.4g; "
               "wrote %s", eigvals[0], eigvals[-1], eigvals.sum(), f[0], f[-1], png)


if __name__ == "__main__":
  common.run_main(main, user_errors=(models.CheckpointError,))
