"""Training throughput: tokens/s and MFU of the JAX train step against PyTorch.

  python -m experiments.bench_train_speed \
      [--models=tiny-gpt2,small-gpt2,gpt2-124m,tiny-t5] [--batch_size=16] [--seq_len=128] \
      [--steps=10] [--repeats=3] [--peak_tflops=0] [--torch_threads=0] [--distributed]

For each model (presets of lensllm_jax.models; decoder-only or
encoder-decoder) it times the jit-compiled AdamW train step of
lensllm_jax.training on random tokens, after a compile and warm-up, and,
when torch and transformers are installed and the architecture has a
transformers twin (GPT-2, T5), a PyTorch eager loop of the same model: the
transformers module built from the same configuration
(`models.config_from_hf` of its config equals ours), with the same weights
(converted from its random init by the Hugging Face conversion), the same
batch and loss (mean NLL per scored token), torch.optim.AdamW with the same
moments, and gradient clipping at the same norm. Both compute the same loss
on the first step (printed: a check that they are the same computation).
The timings alternate (JAX sharded, JAX single-device, torch) --repeats
times, keeping the fastest of each, and it prints

  tokens/s          global batch tokens per second of the JAX step;
  torch tokens/s    the same for the PyTorch loop, and jax/torch their ratio
                    (>1: JAX is faster);
  model TFLOP/s     models.flops_per_token(config, T) * tokens/s;
  MFU               model FLOP/s / (peak per device * devices), with the peak
                    from --peak_tflops, or (default) the FLOP/s of a large
                    matmul measured in this process (the "reference": an
                    attainable, not a nominal, peak -- say which in reports),
                    for JAX and for torch;
  sharded/single    step time with the batch sharded over all devices of a
                    ("data", "fsdp") mesh divided by the step time on one
                    device with the same global batch (on one device this is
                    the overhead of the sharding machinery; >1 means slower);
  compiles          compilations of the train step over all the timed calls
                    (one per placement: the initial state is placed like the
                    step's outputs).

Numbers are ratios against references measured in the same process; there
are no timed assertions anywhere. A JSON line per model goes to --out.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import experiments.common  # noqa: F401  (defines --compilation_cache_dir)
from lensllm_jax import models, training
from lensllm_jax.training import sharding, textdata

_MODELS = flags.DEFINE_list("models", ["tiny-gpt2", "small-gpt2", "gpt2-124m", "tiny-t5"],
                            "Presets to time.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length T.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating measurements; the fastest counts.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "Nominal peak TFLOP/s per device for MFU (0: measured matmul).")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch twin when torch is installed.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0,
                                      "torch.set_num_threads (0: torch's default).")
_OUT = flags.DEFINE_string("out", "", "Append one JSON line per model to this file.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")

TRAIN_CONFIG = training.TrainConfig(learning_rate=1e-4, max_steps=1000)


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
  """Random tokens, every position scored: input_ids, targets, loss_mask, attention_mask [B, T]."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
  return textdata.as_batch(textdata.TokenizedData(
      ids[:, :-1], ids[:, 1:], np.ones((batch, seq), np.float32), np.ones((batch, seq), bool)))


# ---------------------------------------------------------------------------
# The PyTorch twin.


def hf_config_of(config) -> dict | None:
  """The transformers config.json dict of the same model (GPT-2, T5), or None."""
  if config.arch == "gpt2":
    return dict(model_type="gpt2", vocab_size=config.vocab_size, n_positions=config.max_len,
                n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads,
                n_inner=config.d_ff, activation_function=config.activation,
                layer_norm_epsilon=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                eos_token_id=0)
  if config.arch == "t5":
    return dict(model_type="t5", vocab_size=config.vocab_size, d_model=config.d_model,
                d_kv=config.head_dim, d_ff=config.d_ff, num_layers=config.n_layers,
                num_decoder_layers=config.n_decoder_layers, num_heads=config.n_heads,
                relative_attention_num_buckets=config.relative_buckets,
                relative_attention_max_distance=config.relative_max_distance,
                feed_forward_proj=("gated-" if config.gated else "") + config.activation,
                tie_word_embeddings=config.tie_embeddings, layer_norm_epsilon=config.norm_eps,
                pad_token_id=config.pad_token_id,
                decoder_start_token_id=config.decoder_start_token_id, dropout_rate=0.0)
  return None


def torch_twin(config, seed: int = 0):
  """(transformers model, our config, our params) of the same architecture and weights.

  The torch module is built from `hf_config_of(config)` with a seeded random
  init; our config is `models.config_from_hf` of that dict (it must equal
  `config`) and our params the Hugging Face conversion of its weights. None
  when the architecture has no twin.
  """
  import torch
  import transformers

  hf = hf_config_of(config)
  if hf is None:
    return None
  ours = models.config_from_hf(hf, dtype=config.dtype, source="torch twin")
  if ours.arch == "t5":  # relative positions: T5's config.json has no length limit
    ours = dataclasses.replace(ours, max_len=config.max_len)
  if ours != config:
    raise ValueError(f"torch twin of {config} reads back as {ours}")
  torch.manual_seed(seed)
  cls = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
         "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration)}
  config_cls, model_cls = cls[hf["model_type"]]
  module = model_cls(config_cls(**hf)).train()
  tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  params = models.registry.hf_format(hf["model_type"]).convert(tensors, ours, "torch twin")
  return module, ours, params


def torch_train_step(module, cfg: training.TrainConfig, batch: dict):
  """The eager PyTorch step of `module` on `batch`: forward, mean NLL per scored token,
  backward, gradient clipping at cfg.grad_clip, AdamW (cfg's moments, eps, decay, a
  constant learning rate: the JAX schedule's first value). Returns step() -> loss."""
  import torch

  ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
  targets = torch.as_tensor(np.asarray(batch["targets"]), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(batch["loss_mask"]), dtype=torch.float32)
  attention = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)
  opt = torch.optim.AdamW(module.parameters(), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2),
                          eps=cfg.eps, weight_decay=cfg.weight_decay)
  encdec = module.config.is_encoder_decoder

  def step():
    if encdec:
      logits = module(input_ids=ids, attention_mask=attention,
                      decoder_input_ids=module._shift_right(targets)).logits
    else:
      logits = module(input_ids=ids, attention_mask=attention).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                            reduction="none")
    loss = (nll * mask.flatten()).sum() / mask.sum().clamp(min=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
      torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach()

  return step


def torch_timer(module, cfg: training.TrainConfig, batch: dict):
  """Warms up `torch_train_step`; returns (run(n) -> seconds per step, first loss)."""
  step = torch_train_step(module, cfg, batch)

  def run(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      loss = step()
    float(loss)
    return (time.perf_counter() - t0) / n

  first = float(step())
  run(1)  # warm-up
  return run, first


# ---------------------------------------------------------------------------


def make_timer(apply_fn, params, batch, mesh):
  """Compiles and warms up a train step; returns (run(n) -> seconds per step, first loss)."""
  opt, step_fn, _ = training.compiled_steps(apply_fn, TRAIN_CONFIG)
  if mesh is not None:
    batch = sharding.shard_batch(batch, mesh)
  else:
    batch = jax.device_put(batch, jax.local_devices()[0])
  box = [training.init_state(params, opt, mesh=mesh)]
  key = jax.random.key(0)

  def run(n: int) -> float:
    state = box[0]
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = step_fn(state, batch, key)
    m["loss"].block_until_ready()
    box[0] = state
    return (time.perf_counter() - t0) / n

  state, m = step_fn(box[0], batch, key)  # compile; the loss of the first step
  box[0] = state
  run(1)  # warm-up
  return run, float(m["loss"])


def bench_model(name: str, reference_flops: float) -> dict:
  config = models.presets[name].replace(max_len=max(_SEQ.value, 8), dtype=_DTYPE.value)
  twin = None
  if _TORCH.value and _DTYPE.value == "float32":
    try:
      twin = torch_twin(config)
    except ImportError:
      twin = None
  if twin is not None:
    module, config, params = twin
  else:
    params = models.init_params(config, jax.random.key(0))
  apply_fn = training.causal_lm_apply(models.build(config))
  batch = random_batch(config, _BATCH.value, _SEQ.value)
  with training.count_compilations() as compiles:
    timers, first = {}, {}
    for k, mesh in (("sharded", sharding.make_mesh()), ("single", None)):
      timers[k], first[k] = make_timer(apply_fn, params, batch, mesh)
    if twin is not None:
      timers["torch"], first["torch"] = torch_timer(module, TRAIN_CONFIG, batch)
    # Alternate them and keep the best of each (robust to a busy machine).
    best = {k: float("inf") for k in timers}
    for _ in range(_REPEATS.value):
      for k, run in timers.items():
        best[k] = min(best[k], run(_STEPS.value))
  tokens = _BATCH.value * _SEQ.value
  n_dev = jax.device_count()
  flops_per_step = models.flops_per_token(config, _SEQ.value) * tokens
  out = {"model": name, "params": models.count_params(params), "devices": n_dev,
         "device_kind": jax.devices()[0].device_kind, "batch": _BATCH.value,
         "seq_len": _SEQ.value, "dtype": _DTYPE.value,
         "tokens_per_s": tokens / best["sharded"], "tokens_per_s_single": tokens / best["single"],
         "model_tflops": flops_per_step / best["sharded"] / 1e12,
         "mfu": flops_per_step / best["sharded"] / (reference_flops * n_dev),
         "mfu_reference": "nominal peak" if _PEAK.value else "measured matmul",
         "sharded_over_single": best["sharded"] / best["single"],
         "step_compiles": compiles["jit(step_fn)"], "first_loss": first["sharded"]}
  if "torch" in best:
    out.update(torch_tokens_per_s=tokens / best["torch"],
               jax_over_torch=best["torch"] / best["sharded"],
               torch_mfu=flops_per_step / best["torch"] / reference_flops,
               torch_first_loss=first["torch"])
  return out


def main(argv):
  del argv
  sharding.initialize_distributed(_DISTRIBUTED.value)
  if _TORCH.value and _TORCH_THREADS.value:
    import torch

    torch.set_num_threads(_TORCH_THREADS.value)
  reference = _PEAK.value * 1e12 if _PEAK.value else matmul_flops_per_second(_DTYPE.value)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; reference "
        f"{'nominal' if _PEAK.value else 'matmul'} {reference / 1e12:.3f} TFLOP/s per device; "
        f"batch {_BATCH.value} x {_SEQ.value} tokens, {_DTYPE.value}")
  print(f"{'model':>12} {'params':>10} {'tokens/s':>10} {'torch':>10} {'jax/torch':>9} "
        f"{'MFU':>6} {'torch MFU':>9} {'sharded/single':>15} {'compiles':>8} "
        f"{'loss jax / torch':>18}")
  for name in _MODELS.value:
    r = bench_model(name, reference)
    na = float("nan")
    print(f"{r['model']:>12} {r['params']:>10d} {r['tokens_per_s']:>10.0f} "
          f"{r.get('torch_tokens_per_s', na):>10.0f} {r.get('jax_over_torch', na):>9.2f} "
          f"{r['mfu']:>6.3f} {r.get('torch_mfu', na):>9.3f} {r['sharded_over_single']:>15.3f} "
          f"{r['step_compiles']:>8d} {r['first_loss']:>8.4f} / {r.get('torch_first_loss', na):.4f}",
          flush=True)
    if _OUT.value:
      with open(_OUT.value, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  app.run(main)
