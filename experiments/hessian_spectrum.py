r"""Hessian spectrum and per-layer PAC-Bayes quantities of a fine-tuned LM.

For a model preset (or pre-trained and fine-tuned checkpoints) and a set of
training sequences, writes to --workdir:

  manifest.json      the config of the run and the sha256 of its input files
                     (lensllm_jax/rundir.py: a rerun with others must use
                     --overwrite or another workdir; one run per workdir)
  params_*.msgpack   pre-trained and fine-tuned parameters (reused on rerun)
  eigenvalues.csv    top-k Hessian eigenvalues by Lanczos (rank, eigenvalue,
                     residual_norm, residual_estimate) at the fine-tuned point
  trace.json         Hutchinson trace (trace, stderr, num_probes) and the
                     power-iteration top eigenvalue
  density.csv/.png   SLQ spectral density (grid, density) and its plot;
  slq_nodes.csv      the raw Ritz nodes and Gauss weights per probe
  pac_bayes.csv      per-layer table (lensllm_jax.theory.pac_bayes.LayerRow)
  summary.json       everything above in one file, plus the bound
                     sum_i sqrt(C H_i / n) with H_i = vhpv_max

Each step skips its work when its output exists. The loss is the project's
LM loss, the mean NLL per target token (`models.losses.mean_token_nll`, as in
training and the study; `hessian_common.lm_loss_fn`); the Hessian of the spectrum is that of the mean loss
over all config.num_examples sequences, streamed as [num_examples / batch_size]
stacked batches (lax.scan; every sequence has config.seq_len target tokens, so the
mean of the batch means is the per-token mean); the PAC-Bayes maxima are over
single sequences.

Without checkpoints (the default) the run is a self-contained demo: the
"pre-trained" model is the seeded initialisation trained for
config.pretrain_steps Adam steps on sequences from one random Markov chain, the
"fine-tuned" model continues for config.finetune_steps steps on config.num_examples
sequences of a second chain (the task). With config.pretrained_ckpt and
config.finetuned_ckpt (directories written by lensllm_jax.training.save_params,
e.g. pretrained/<model> and, with config.save_finetuned, finetuned/<model>/<D>
of experiments.finetune_sweep) those parameters are used instead; the model's
shape and vocabulary are config.model_config's (a JSON file of ModelConfig or
EncoderDecoderConfig fields, `models.config_from_dict`: the sweep writes
models/<model>.json) or else config.preset's. The task data come from
config.tokens_npy or the Markov chain, as [N, T + 1] token ids for a
decoder-only model (inputs s[:-1], next-token targets s[1:]) and [N, 2 T] for
an encoder-decoder (T5, mT5, Switch, BART): the encoder reads the first T
tokens, the decoder (teacher-forced, `models.shift_right`) predicts the last
T, and the loss is the NLL of those T target tokens (`hessian_common.token_batch`;
the Switch router losses, a training regulariser, are not part of it).

  python -m experiments.hessian_spectrum --config=configs/hessian_spectrum.py \
      --workdir=results/hessian_spectrum
  # ~1-2 min on 2 CPU cores for tiny-gpt2 with the defaults (mostly compilation)
"""

from __future__ import annotations

import json
import os
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from absl import app, flags, logging

from experiments import common, reporting  # common also defines --compilation_cache_dir
from experiments.hessian_common import example_length, lm_loss_fn, markov_tokens, token_batch
from lensllm_jax import errors, models, rundir
from lensllm_jax.models import build, init_params, presets
from lensllm_jax.theory import hessian, pac_bayes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags; defined only when it runs as a program (tests import it)."""
  common.define_config_file("configs/hessian_spectrum.py",
                            "Configuration (configs/hessian_spectrum.py).")
  flags.DEFINE_string("workdir", "results/hessian_spectrum", "Output directory.")
  flags.DEFINE_bool("overwrite", False, "Recompute everything.")


# The config fields recorded in workdir/manifest.json (a rerun with others is refused).
_RUN_FIELDS = ("preset", "model_config", "pretrained_ckpt", "finetuned_ckpt", "tokens_npy",
               "num_examples", "seq_len", "batch_size", "pretrain_steps", "finetune_steps",
               "learning_rate", "lanczos", "hutchinson", "slq", "pac_bayes", "seed")


def load_task_data(cfg, config) -> dict[str, np.ndarray]:
  """Step 1a: the n training sequences (config.tokens_npy or the task Markov chain)."""
  n, t = cfg.num_examples, cfg.seq_len
  enc_dec = config.is_encoder_decoder
  length = example_length(t, enc_dec)
  if cfg.tokens_npy:
    tokens = common.load_token_ids(cfg.tokens_npy, "config.tokens_npy", config.vocab_size)
    if tokens.shape[0] < n or tokens.shape[1] != length:
      shape = "2 * config.seq_len (encoder-decoder)" if enc_dec else "config.seq_len + 1"
      raise errors.DataError(f"config.tokens_npy {cfg.tokens_npy}: need shape [>= {n}, "
                             f"{length}] (config.num_examples, {shape}), got {tokens.shape}")
    return token_batch(tokens[:n], enc_dec)
  return token_batch(markov_tokens(config.vocab_size, n, length, chain_seed=1000 + cfg.seed,
                                   seed=cfg.seed), enc_dec)


def train(cfg, loss, params, data, steps, key):
  """Adam steps on random minibatches of `data` (demo training)."""
  opt = optax.adam(cfg.learning_rate)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  n = data["input_ids"].shape[0]
  value = jnp.nan
  for s in range(steps):
    idx = np.asarray(jax.random.choice(jax.random.fold_in(key, s), n, (cfg.batch_size,), False))
    params, state, value = step(params, state, {k: v[idx] for k, v in data.items()})
  if not np.isfinite(float(value)):
    raise FloatingPointError(f"training loss is not finite after {steps} steps")
  return params, float(value)


def load_checkpoints(cfg, config):
  """(pre-trained, fine-tuned) params of config.pretrained_ckpt / finetuned_ckpt, or None
  (the demo trains its own); `errors.CheckpointError` naming an unreadable one."""
  if bool(cfg.pretrained_ckpt) != bool(cfg.finetuned_ckpt):
    raise errors.ConfigError("pass both config.pretrained_ckpt and config.finetuned_ckpt, "
                             "or neither")
  if not cfg.pretrained_ckpt:
    return None
  from lensllm_jax import training  # orbax only when checkpoints are used
  # Shapes only (no compiled initialisation): the template of the checkpoints.
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(cfg.seed)))
  return (training.load_params(cfg.pretrained_ckpt, shapes),
          training.load_params(cfg.finetuned_ckpt, shapes))


def read_cached_params(path: str, like):
  """A params_*.msgpack of this workdir as `like`'s tree; a cut or corrupt file, or one of
  other shapes, is an `errors.CheckpointError` naming it."""
  with open(path, "rb") as f:
    data = f.read()
  try:  # msgpack: ValueError (cut, extra data, other keys), AttributeError (not a dict)
    params = flax.serialization.from_bytes(like, data)
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    detail = " ".join(str(e).split())[:200]
    raise errors.CheckpointError(
        f"{path}: not a readable cache of these parameters ({type(e).__name__}: {detail}); "
        "delete it or rerun with --overwrite") from None
  shapes, want = jax.tree.map(np.shape, params), jax.tree.map(np.shape, like)
  if shapes != want:
    raise errors.CheckpointError(f"{path}: cached parameters of other shapes than the model's; "
                                 "delete it or rerun with --overwrite")
  return params


def get_params(cfg, loss, config, data, workdir):
  """Step 1b: pre-trained and fine-tuned params (cache or demo training)."""
  key = jax.random.PRNGKey(cfg.seed)
  like = init_params(config, key)
  paths = [os.path.join(workdir, f"params_{name}.msgpack") for name in ("pretrained", "finetuned")]
  if all(os.path.exists(p) for p in paths):
    out = [read_cached_params(p, like) for p in paths]
    logging.info("reusing %s", paths)
    return tuple(out)
  t0 = time.time()
  pool = token_batch(markov_tokens(
      config.vocab_size, 4 * cfg.num_examples,
      example_length(cfg.seq_len, config.is_encoder_decoder),
      chain_seed=cfg.seed, seed=cfg.seed + 1), config.is_encoder_decoder)
  params0, l0 = train(cfg, loss, like, pool, cfg.pretrain_steps, jax.random.fold_in(key, 1))
  params1, l1 = train(cfg, loss, params0, data, cfg.finetune_steps, jax.random.fold_in(key, 2))
  logging.info("demo training: pre-train loss %.3f, fine-tune loss %.3f (%.1fs)", l0, l1,
               time.time() - t0)
  for p, params in zip(paths, (params0, params1), strict=True):
    with open(p, "wb") as f:
      f.write(flax.serialization.to_bytes(params))
  return params0, params1


def spectrum(cfg, loss, params, data, workdir, key):
  """Step 2: top-k eigenvalues, trace, power iteration and the SLQ density."""
  eig_path, trace_path = os.path.join(workdir, "eigenvalues.csv"), os.path.join(workdir,
                                                                                  "trace.json")
  dens_path = os.path.join(workdir, "density.csv")
  if all(os.path.exists(p) for p in (eig_path, trace_path, dens_path)):
    logging.info("spectrum: outputs exist, skipping")
    return
  n, bs = cfg.num_examples, cfg.batch_size  # n % bs == 0: `validate_config`
  stacked = {k: v.reshape(n // bs, bs, *v.shape[1:]) for k, v in data.items()}
  device = jax.local_devices()[0]
  traced = hessian.hvp_operator(loss, params, jax.device_put(stacked, device), data_mode="stacked")
  # Host-driven drivers over one compiled HVP: a traced operator would compile the
  # model's HVP into each of the four drivers, and compilation dominates small runs.
  # Every input is committed to one device, so the HVP compiles once, not once per
  # committed/uncommitted argument pattern.
  op = hessian.LinearOperator(lambda v: traced.matvec(jax.device_put(v, device)), traced.dim,
                              traced.dtype, traceable=False)
  logging.info("Hessian over %d parameters, %d batches of %d sequences", op.dim, n // bs, bs)
  t0 = time.time()
  k = cfg.lanczos.k
  eig = hessian.lanczos_eigs(op, jax.random.fold_in(key, 0), k=k, num_iters=cfg.lanczos.iters)
  pd.DataFrame({"rank": np.arange(1, k + 1), "eigenvalue": np.asarray(eig.eigenvalues),
                "residual_norm": np.asarray(eig.residual_norms),
                "residual_estimate": np.asarray(eig.residual_estimates)}).to_csv(eig_path,
                                                                                 index=False)
  logging.info("lanczos top-%d in %.1fs: %s", k, time.time() - t0,
               np.array2string(np.asarray(eig.eigenvalues), precision=4))
  t0 = time.time()
  power = hessian.power_iteration(op, jax.random.fold_in(key, 1), max_iters=100, tol=1e-3)
  tr = hessian.hutchinson_trace(op, jax.random.fold_in(key, 2), cfg.hutchinson.probes)
  logging.info("power %.4f (%d its, residual %.2e); trace %.4f +- %.4f (%.1fs)",
               float(power.eigenvalue), int(power.num_iters), float(power.residual_norm),
               float(tr.trace), float(tr.stderr), time.time() - t0)
  t0 = time.time()
  slq = hessian.slq_density(op, jax.random.fold_in(key, 3), num_probes=cfg.slq.probes,
                            num_iters=cfg.slq.iters)
  logging.info("SLQ %d probes x %d steps in %.1fs", cfg.slq.probes, slq.num_iters,
               time.time() - t0)
  nodes, weights = np.asarray(slq.nodes), np.asarray(slq.weights)
  pd.DataFrame({"probe": np.repeat(np.arange(nodes.shape[0]), nodes.shape[1]),
                "node": nodes.ravel(), "weight": weights.ravel()}).to_csv(
                    os.path.join(workdir, "slq_nodes.csv"), index=False)
  reporting.hessian_density_figure(np.asarray(slq.grid), np.asarray(slq.density),
                                   np.asarray(eig.eigenvalues), model_name(cfg),
                                   os.path.join(workdir, "density.png"))
  with open(trace_path, "w") as f:
    json.dump({"trace": float(tr.trace), "stderr": float(tr.stderr),
               "num_probes": tr.num_probes, "num_params": op.dim,
               "power_eigenvalue": float(power.eigenvalue),
               "power_iters": int(power.num_iters),
               "power_residual": float(power.residual_norm),
               "slq_sigma": slq.sigma}, f, indent=1)
  pd.DataFrame({"grid": np.asarray(slq.grid), "density": np.asarray(slq.density)}).to_csv(
      dens_path, index=False)


def pac_bayes_table(cfg, loss, params0, params1, data, workdir, key):
  """Step 3: the per-layer table and the bound."""
  path = os.path.join(workdir, "pac_bayes.csv")
  if os.path.exists(path):
    logging.info("pac_bayes: %s exists, skipping", path)
    return pd.read_csv(path)
  t0 = time.time()
  pb = cfg.pac_bayes
  rows = pac_bayes.layer_table(loss, params1, params0, data, key, num_iters=pb.iters, c=pb.c,
                               n=pb.n or cfg.num_examples)
  frame = pd.DataFrame(rows)
  frame.to_csv(path, index=False)
  logging.info("PAC-Bayes table (%.1fs):\n%s", time.time() - t0, frame.to_string())
  return frame


def write_summary(cfg, workdir, frame):
  """Step 4: summary.json."""
  c, n = cfg.pac_bayes.c, cfg.pac_bayes.n or cfg.num_examples
  with open(os.path.join(workdir, "trace.json")) as f:
    trace = json.load(f)
  eig = pd.read_csv(os.path.join(workdir, "eigenvalues.csv"))
  summary = {"preset": cfg.preset, "top_eigenvalues": eig["eigenvalue"].tolist(), **trace,
             "pac_bayes_sum_max": pac_bayes.pac_bayes_bound(frame["vhpv_max"], c, n),
             "pac_bayes_sum_mean": pac_bayes.pac_bayes_bound(frame["vhpv_mean"], c, n),
             "c": c, "n": n, "layers": frame.to_dict(orient="list")}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  logging.info("sum_i sqrt(C H_i / n) = %.4g (max over examples), %.4g (mean)",
               summary["pac_bayes_sum_max"], summary["pac_bayes_sum_mean"])


def open_workdir(cfg, workdir, overwrite: bool = False):
  """`rundir.open_output_dir`: one run per workdir, a manifest of the config's _RUN_FIELDS and
  the sha256 of its input files (checkpoints, model config, tokens); --overwrite recomputes."""
  inputs = {name: cfg[name] for name in ("model_config", "pretrained_ckpt", "finetuned_ckpt",
                                         "tokens_npy") if cfg[name]}
  return rundir.open_output_dir(workdir, config={name: cfg[name] for name in _RUN_FIELDS},
                                inputs=inputs, outputs=("*.csv", "*.json", "*.png", "*.msgpack"),
                                overwrite=overwrite)


def model_name(cfg) -> str:
  """config.model_config's file stem (the sweep's model name), else config.preset."""
  return os.path.splitext(os.path.basename(cfg.model_config))[0] if cfg.model_config else cfg.preset


def model_config(cfg):
  """Step 0: the model's config (config.model_config JSON, else the preset, long enough):
  a `models.ModelConfig` or, for arch t5/mt5/switch/bart, a `models.EncoderDecoderConfig`."""
  if cfg.model_config:
    source = f"config.model_config {cfg.model_config}"
    try:
      fields = common.read_json(cfg.model_config, errors.CheckpointError, "config.model_config")
      config = models.config_from_dict(fields, source=source)
    except ValueError as e:
      if isinstance(e, errors.InputError):
        raise
      raise errors.CheckpointError(str(e)) from e
    if config.max_len < cfg.seq_len:
      raise errors.ConfigError(f"config.seq_len {cfg.seq_len} exceeds max_len "
                               f"{config.max_len} of {source}")
    return config
  if cfg.preset not in presets:
    raise errors.ConfigError(f"config.preset={cfg.preset!r} unknown; choose from "
                             f"{sorted(presets)}")
  return presets[cfg.preset].replace(max_len=max(presets[cfg.preset].max_len, cfg.seq_len))


def validate_config(cfg) -> None:
  """Range checks of the config's fields, before any input is read (`errors.ConfigError`)."""
  for name in ("num_examples", "seq_len", "batch_size", "lanczos.k", "lanczos.iters",
               "slq.probes", "slq.iters", "pac_bayes.iters"):
    common.integer_field(cfg, name, low=1)
  for name in ("pretrain_steps", "finetune_steps", "seed"):
    common.integer_field(cfg, name, low=0 if name != "seed" else None)
  common.integer_field(cfg, "hutchinson.probes", low=2)  # its stderr needs two
  common.integer_field(cfg, "pac_bayes.n", low=1, optional=True)
  if cfg.num_examples % cfg.batch_size:
    raise errors.ConfigError(f"config.num_examples={cfg.num_examples} must be a multiple of "
                             f"config.batch_size={cfg.batch_size}")
  if cfg.lanczos.k > cfg.lanczos.iters:
    raise errors.ConfigError(f"config.lanczos.k={cfg.lanczos.k}: at most config.lanczos.iters="
                             f"{cfg.lanczos.iters} eigenvalues")
  for name, value in (("learning_rate", cfg.learning_rate), ("pac_bayes.c", cfg.pac_bayes.c)):
    if not 0 < value < float("inf"):
      raise errors.ConfigError(f"config.{name}={value}: must be a finite number > 0")


def run(cfg, workdir, *, overwrite: bool = False) -> None:
  """Every input checked and read (config, model config, tokens, checkpoints), then steps
  0-3 into workdir (locked and bound by `open_workdir`)."""
  validate_config(cfg)
  config = model_config(cfg)
  data = load_task_data(cfg, config)
  checkpoints = load_checkpoints(cfg, config)
  with open_workdir(cfg, workdir, overwrite) as out:
    _run(cfg, str(out), config, data, checkpoints)


def _run(cfg, workdir: str, config, data, checkpoints) -> None:
  loss = lm_loss_fn(build(config))
  params0, params1 = checkpoints or get_params(cfg, loss, config, data, workdir)
  key = jax.random.PRNGKey(cfg.seed + 7)
  spectrum(cfg, loss, params1, data, workdir, jax.random.fold_in(key, 0))
  frame = pac_bayes_table(cfg, loss, params0, params1, data, workdir, jax.random.fold_in(key, 1))
  write_summary(cfg, workdir, frame)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
