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

  python -m experiments.ntk_spectrum --workdir=/tmp/ntk --config.preset=tiny-gpt2 \
      --config.n=128
  python -m experiments.ntk_spectrum --workdir=/tmp/ntk --config.preset=gpt2-124m \
      --config.n=256 --config.ntk.kernel=sketched --config.ntk.sketch_dim=4096
      # unbiased sketch, memory O(n k + block)
  python -m experiments.ntk_spectrum --workdir=/tmp/ntk --config.preset=tiny-llama \
      --config.checkpoint=/path/to/orbax_params --config.ntk.blocks="('layers_1','lm_head')"
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
from lensllm_jax import errors, models, rundir
from lensllm_jax.theory import ntk

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags; defined only when it runs as a program (tests import it)."""
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  common.define_config_file("configs/ntk_spectrum.py", "Configuration (configs/ntk_spectrum.py).")


def load_model(cfg):
  """(config, model, params) of the config (a preset, an orbax or a Hugging Face checkpoint)."""
  if cfg.hf_checkpoint:
    config, params = models.load_hf_checkpoint(cfg.hf_checkpoint)
    return config, models.build(config), params
  config = models.presets[cfg.preset]  # a preset's name: checked by `validate_config`
  if cfg.checkpoint:
    from lensllm_jax import training
    # Shapes only (no compiled initialisation): the template of the checkpoint.
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(cfg.seed)))
    return config, models.build(config), training.load_params(cfg.checkpoint, like=shapes)
  return config, models.build(config), models.init_params(config, jax.random.key(cfg.seed))


def load_probe(cfg, config) -> np.ndarray:
  """Token ids [n, T] int32 (config.probe, else random)."""
  if cfg.probe:
    ids = common.load_token_ids(cfg.probe, "config.probe", config.vocab_size)
    if ids.shape[1] > config.max_len:
      raise errors.DataError(f"config.probe={cfg.probe}: length {ids.shape[1]} > max_len "
                             f"{config.max_len}")
    return ids.astype(np.int32)
  rng = np.random.default_rng(cfg.seed + 1)
  return rng.integers(0, config.vocab_size, (cfg.n, cfg.seq_len), dtype=np.int32)


def compute_kernel(cfg, workdir, model, params, ids, meta):
  """Blocked NTK [n, n]; reuses kernel.npy when meta.json matches."""
  kernel_path = os.path.join(workdir, "kernel.npy")
  meta_path = os.path.join(workdir, "meta.json")
  if os.path.exists(kernel_path) and os.path.exists(meta_path):
    with open(meta_path) as fh:
      if json.load(fh) == meta:
        logging.info("reusing %s", kernel_path)
        return np.load(kernel_path)
  kc = cfg.ntk
  apply_fn = ntk.lm_output_fn(model, kc.output)
  mask = ntk.param_mask_from_names(params, kc.blocks) if kc.blocks else None
  start = time.perf_counter()

  def progress(done, total):
    rate = done / (time.perf_counter() - start)
    logging.info("kernel blocks %d/%d (%.2f block pairs/s)", done, total, rate)

  if kc.kernel == "sketched":  # key: config.seed, so a rerun gives the same sketch
    fn = ntk.make_sketched_ntk_fn(apply_fn, sketch_dim=kc.sketch_dim,
                                  key=jax.random.fold_in(jax.random.key(cfg.seed), 1),
                                  param_mask=mask, sketch=kc.sketch, block_size=kc.block_size)
  else:
    fn = ntk.make_blocked_ntk_fn(
        ntk.make_ntk_fn(apply_fn, param_mask=mask, implementation=kc.implementation),
        block_size=kc.block_size, pairs_per_call=4, progress=progress)
  theta = np.asarray(jax.device_get(fn(params, jnp.asarray(ids))), np.float32)
  logging.info("kernel %s in %.1fs", theta.shape, time.perf_counter() - start)
  np.save(kernel_path, theta)
  with open(meta_path, "w") as fh:
    json.dump(meta, fh, indent=1)
  return theta


def t_grid(cfg, eigvals: np.ndarray) -> np.ndarray:
  if cfg.t_grid.range:
    lo, hi = (float(v) for v in cfg.t_grid.range)  # checked by `validate_config`
  else:
    positive = eigvals[eigvals > 0]
    if positive.size == 0:
      raise ValueError("kernel has no positive eigenvalue: F(t) is constant")
    # From 1 % of the fastest mode's time scale until the slowest mode (floored
    # at 1e-6 lambda_max) has decayed by exp(-10).
    lo = 1e-2 / (cfg.eta * positive.max())
    hi = 5.0 / (cfg.eta * max(positive.min(), 1e-6 * positive.max()))
  return np.concatenate([[0.0], np.geomspace(lo, hi, cfg.t_grid.points)])


def write_csv(path, header, rows):
  with open(path, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(header)
    writer.writerows(rows)


def validate_config(cfg) -> None:
  """The config's fields, before any input is read (`errors.ConfigError` naming the field)."""
  for name, allowed in (("output", ("log_likelihood", "nll")), ("kernel", ("exact", "sketched")),
                        ("implementation", tuple(ntk.IMPLEMENTATIONS)),
                        ("sketch", tuple(ntk.SKETCHES))):
    if cfg.ntk[name] not in allowed:
      raise errors.ConfigError(f"config.ntk.{name}={cfg.ntk[name]!r}: expected one of "
                               f"{list(allowed)}")
  for name in ("n", "seq_len", "ntk.block_size", "ntk.sketch_dim", "t_grid.points"):
    common.integer_field(cfg, name, low=1)
  common.integer_field(cfg, "seed")
  if not cfg.hf_checkpoint and cfg.preset not in models.presets:
    raise errors.ConfigError(f"config.preset={cfg.preset!r}: not one of "
                             f"{sorted(models.presets)}")
  if cfg.checkpoint and not os.path.exists(cfg.checkpoint):
    raise errors.CheckpointError(f"config.checkpoint={cfg.checkpoint}: no such path")
  if not 0 < cfg.eta < float("inf"):
    raise errors.ConfigError(f"config.eta={cfg.eta}: must be a finite number > 0")
  if cfg.t_grid.range:
    t = list(cfg.t_grid.range)
    if len(t) != 2 or not all(isinstance(v, (int, float)) for v in t) or not 0 < t[0] < t[1]:
      raise errors.ConfigError(f"config.t_grid.range={t}: expected (t_min, t_max) with "
                               "0 < t_min < t_max")


def run(cfg, workdir) -> None:
  """Every input checked and read (config, model, probe), then the kernel, its spectrum and
  F(t) into workdir (locked and keyed on the config and inputs: `rundir.open_output_dir`)."""
  validate_config(cfg)
  if cfg.hf_checkpoint or cfg.checkpoint:  # input files: read and checked first
    loaded = load_model(cfg)
    ids = load_probe(cfg, loaded[0])
  else:
    loaded, ids = None, load_probe(cfg, models.presets[cfg.preset])
  with open_workdir(cfg, workdir) as out:
    config, model, params = loaded or load_model(cfg)  # a seeded init is work: after the checks
    _run(cfg, str(out), config, model, params, ids)


def open_workdir(cfg, workdir):
  """`rundir.open_output_dir`: locked, keyed on the config and the sha256 of its input files
  (checkpoint, Hugging Face directory, probe); config.overwrite recomputes."""
  inputs = {name: cfg[name] for name in ("checkpoint", "hf_checkpoint", "probe") if cfg[name]}
  return rundir.open_output_dir(workdir, config=cfg, inputs=inputs,
                                outputs=("*.npy", "*.json", "*.csv", "*.png"),
                                overwrite=cfg.overwrite)


def _run(cfg, workdir: str, config, model, params, ids) -> None:
  kc = cfg.ntk
  meta = dict(preset=cfg.preset, checkpoint=cfg.checkpoint,
              hf_checkpoint=cfg.hf_checkpoint, seed=cfg.seed, probe=cfg.probe,
              probe_shape=list(ids.shape), output=kc.output, blocks=list(kc.blocks),
              implementation=kc.implementation, num_params=models.count_params(params),
              ntk=kc.kernel, **({"sketch_dim": kc.sketch_dim, "sketch": kc.sketch}
                                if kc.kernel == "sketched" else {}))
  logging.info("model %s, %d params; probe %s", config.arch, meta["num_params"], ids.shape)
  theta = compute_kernel(cfg, workdir, model, params, ids, meta)
  f0 = np.asarray(ntk.lm_output_fn(model, kc.output)(params, jnp.asarray(ids)), np.float64)
  r0 = f0 - cfg.target
  np.save(os.path.join(workdir, "residual.npy"), r0)

  spec = ntk.ntk_spectrum(theta, r0)
  order = np.argsort(np.asarray(spec.eigvals))[::-1]
  eigvals, proj = np.asarray(spec.eigvals)[order], np.asarray(spec.proj)[order]
  write_csv(os.path.join(workdir, "spectrum.csv"), ["k", "eigenvalue", "proj", "proj_sq"],
            [(k, lam, p, p * p) for k, (lam, p) in enumerate(zip(eigvals, proj, strict=True))])

  ts = t_grid(cfg, eigvals)
  with jax.enable_x64(True):
    f = np.asarray(ntk.ntk_test_loss(jnp.asarray(eigvals), jnp.asarray(proj), cfg.eta,
                                     jnp.asarray(ts)))
  write_csv(os.path.join(workdir, "f_t.csv"), ["t", "F", "F_over_F0"],
            [(t, v, v / f[0]) for t, v in zip(ts, f, strict=True)])
  png = os.path.join(workdir, "ntk_spectrum.png")
  reporting.ntk_spectrum_figure(eigvals, ts, f, cfg.eta, png)
  logging.info("lambda_max %.4g, lambda_min %.4g, trace %.4g; F(0) %.4g -> F(t_max) %.4g; "
               "wrote %s", eigvals[0], eigvals[-1], eigvals.sum(), f[0], f[-1], png)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
