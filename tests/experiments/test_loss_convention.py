"""One LM loss convention: the Hessian binaries and the study analyse the same loss."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import hessian_common, lensllm_study
from lensllm_jax import models
from lensllm_jax.theory import hessian

CONFIG = models.ModelConfig(arch="gpt2", vocab_size=16, max_len=8, d_model=8, n_layers=1,
                            n_heads=2)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CONFIG.vocab_size, (4, 8))
  batch = hessian_common.shifted_token_batch(np.concatenate([ids, ids[:, :1]], 1))
  # Different numbers of target tokens per row (1, 3, 5, 8): per-token and
  # per-sequence means differ.
  batch["loss_mask"] = (np.arange(8)[None, :] < np.array([1, 3, 5, 8])[:, None]).astype(
      np.float32)
  batch["attention_mask"] = np.ones((4, 8), np.int32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _reference_loss(logits, batch):
  """numpy: sum of masked token NLL / number of target tokens."""
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                         keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  m = np.asarray(batch["loss_mask"], np.float64)
  return (nll * m).sum() / m.sum()


def test_hessian_binary_and_study_share_loss_and_top_eigenvalue():
  model = models.build(CONFIG)
  # Scaled-up random weights: confident, token-dependent predictions (at the
  # initialisation every token's NLL is close to log V, whatever the weighting).
  params = jax.tree.map(lambda x: 4.0 * x, models.init_params(CONFIG, jax.random.key(0)))
  batch = _batch()
  binary_loss = hessian_common.lm_loss_fn(model)
  study_loss = lensllm_study.loss_fn_for(CONFIG)
  # Eager (not jitted): a model this small runs op by op faster than it compiles.
  logits = model.apply({"params": params}, batch["input_ids"])
  want = _reference_loss(logits, batch)
  np.testing.assert_allclose(float(binary_loss(params, batch)), want, rtol=1e-5)
  np.testing.assert_allclose(float(study_loss(params, batch)), want, rtol=1e-5)
  # The per-sequence mean (the binaries' former loss) differs here: the check can fail.
  old = np.mean([_reference_loss(logits[i:i + 1], {k: v[i:i + 1] for k, v in batch.items()})
                 for i in range(4)])
  assert abs(old - want) > 1e-2 * want

  # The binary's Hessian operator (hessian_spectrum: stacked batches) and the
  # study's (hessian_fn_for: one batch) are the same matrix.
  op_binary = hessian.hvp_operator(binary_loss, params, jax.tree.map(lambda x: x[None], batch),
                                   data_mode="stacked")
  op_study = hessian.hvp_operator(study_loss, params, batch)
  v = jax.random.normal(jax.random.key(2), (op_study.dim,))
  np.testing.assert_allclose(op_binary.matvec(v), op_study.matvec(v), rtol=1e-4, atol=1e-6)
  # Top eigenpair by the binary's Lanczos (host-driven over its compiled HVP, as in
  # hessian_spectrum): an eigenpair of the study's Hessian too.
  host = hessian.LinearOperator(op_binary.matvec, op_binary.dim, op_binary.dtype,
                                traceable=False)
  eig = hessian.lanczos_eigs(host, jax.random.key(1), k=1, num_iters=30)
  top, u = float(eig.eigenvalues[0]), eig.eigenvectors[0]
  hu = op_study.matvec(u)
  np.testing.assert_allclose(float(u @ hu), top, rtol=1e-4)
  assert float(jnp.linalg.norm(hu - top * u)) < 1e-2 * abs(top)
