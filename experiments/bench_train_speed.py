r"""Training throughput: tokens/s, MFU estimate, sharded vs single-device step.

  python -m experiments.bench_train_speed [--models=tiny-gpt2,small-gpt2] \
      [--batch_size=16] [--seq_len=128] [--steps=10] [--peak_tflops=0] [--distributed]

For each model (presets of lensllm_jax.models) it times the jit-compiled
AdamW train step of lensllm_jax.training on random tokens, after a compile
and warm-up, alternating --repeats timings of the sharded and single-device
steps and keeping the fastest of each, and prints

  tokens/s          global batch tokens per second;
  model TFLOP/s     models.flops_per_token(config, T) * tokens/s;
  MFU               model FLOP/s / (peak per device * devices), with the peak
                    from --peak_tflops, or (default) the FLOP/s of a large
                    matmul measured in this process (the "reference": an
                    attainable, not a nominal, peak -- say which in reports);
  sharded/single    step time with the batch sharded over all devices of a
                    ("data", "fsdp") mesh divided by the step time on one
                    device with the same global batch (on one device this is
                    the overhead of the sharding machinery; >1 means slower).

Numbers are ratios against references measured in the same process; there
are no timed assertions anywhere. A JSON line per model goes to --out.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from lensllm_jax import models, training
from lensllm_jax.training import sharding, textdata

_MODELS = flags.DEFINE_list("models", ["tiny-gpt2", "small-gpt2"], "Presets to time.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length T.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating measurements; the fastest counts.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "Nominal peak TFLOP/s per device for MFU (0: measured matmul).")
_OUT = flags.DEFINE_string("out", "", "Append one JSON line per model to this file.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")


def matmul_flops_per_second(dtype: str, n: int = 2048, reps: int = 5) -> float:
  """Measured FLOP/s of an n x n matmul on the default device (the MFU reference).

  Best of 3 timings of `reps` matmuls.
  """
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 * reps / best


def random_batch(config, batch: int, seq: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
  return textdata.as_batch(textdata.TokenizedData(
      ids[:, :-1], ids[:, 1:], np.ones((batch, seq), np.float32), np.ones((batch, seq), bool)))


def make_timer(apply_fn, params, batch, mesh):
  """Compiles and warms up a train step; returns run(n) -> seconds per step."""
  cfg = training.TrainConfig(learning_rate=1e-4, batch_size=_BATCH.value, max_steps=1000)
  opt = training.make_optimizer(cfg)
  step_fn = training.make_train_step(apply_fn, opt)
  params = jax.tree.map(jnp.array, params)
  if mesh is not None:
    params = sharding.put_params(params, mesh)
    batch = sharding.shard_batch(batch, mesh)
  else:
    params, batch = jax.device_put((params, batch), jax.devices()[0])
  box = [training.init_state(params, opt)]
  key = jax.random.key(0)

  def run(n: int) -> float:
    state = box[0]
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = step_fn(state, batch, key)
    m["loss"].block_until_ready()
    box[0] = state
    return (time.perf_counter() - t0) / n

  run(2)  # compile + warm-up
  return run


def bench_model(name: str, reference_flops: float) -> dict:
  config = models.presets[name].replace(max_len=max(_SEQ.value, 8), dtype=_DTYPE.value)
  params = models.init_params(config, jax.random.key(0))
  apply_fn = training.causal_lm_apply(models.build(config))
  batch = random_batch(config, _BATCH.value, _SEQ.value)
  timers = {"single": make_timer(apply_fn, params, batch, None),
             "sharded": make_timer(apply_fn, params, batch, sharding.make_mesh())}
  # Alternate the two and keep the best of each (robust to a busy machine).
  best = {k: float("inf") for k in timers}
  for _ in range(_REPEATS.value):
    for k, run in timers.items():
      best[k] = min(best[k], run(_STEPS.value))
  t_single, t_sharded = best["single"], best["sharded"]
  tokens = _BATCH.value * _SEQ.value
  n_dev = jax.device_count()
  model_flops = models.flops_per_token(config, _SEQ.value) * tokens / t_sharded
  return {"model": name, "params": models.count_params(params), "devices": n_dev,
          "device_kind": jax.devices()[0].device_kind, "batch": _BATCH.value,
          "seq_len": _SEQ.value, "dtype": _DTYPE.value,
          "tokens_per_s": tokens / t_sharded, "tokens_per_s_single": tokens / t_single,
          "model_tflops": model_flops / 1e12, "mfu": model_flops / (reference_flops * n_dev),
          "mfu_reference": "nominal peak" if _PEAK.value else "measured matmul",
          "sharded_over_single": t_sharded / t_single}


def main(argv):
  del argv
  sharding.initialize_distributed(_DISTRIBUTED.value)
  reference = _PEAK.value * 1e12 if _PEAK.value else matmul_flops_per_second(_DTYPE.value)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; reference "
        f"{'nominal' if _PEAK.value else 'matmul'} {reference / 1e12:.3f} TFLOP/s per device")
  print(f"{'model':>12} {'params':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'sharded/single':>15}")
  for name in _MODELS.value:
    r = bench_model(name, reference)
    print(f"{r['model']:>12} {r['params']:>10d} {r['tokens_per_s']:>10.0f} "
          f"{r['model_tflops']:>8.4f} {r['mfu']:>6.3f} {r['sharded_over_single']:>15.3f}")
    if _OUT.value:
      with open(_OUT.value, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  app.run(main)
