"""Empirical neural tangent kernels, the NTK test loss F(Theta, t), NTK evolution.

Kernel. For a model output f(w, x) with per-example outputs of shape
[n, *out] and a selected subset w_S of the parameters (the others held fixed),
the empirical NTK is

    Theta(x1, x2) = J(x1) J(x2)^T,   J = d f / d w_S,

of shape [n1, n2, d1, d1', d2, d2', ...]: the example axes first, then one
pair per output axis that is not traced (neural-tangents' `zip` layout). A
traced output axis (e.g. the vocabulary of logits) is contracted:

    trace_reduction="mean":  Theta = (1/V) sum_v J_v(x1) J_v(x2)^T
                             (neural-tangents' convention, the default);
    trace_reduction="sum":   Theta = sum_v J_v(x1) J_v(x2)^T (the true trace).

"mean" is the per-output kernel under the usual assumption that the V
outputs share one kernel (Theta_full = Theta (x) I_V); that is the kernel to
put into F(Theta, t) when each output is treated as an independent
regression target. Per-example scalar outputs (the mean token log-likelihood
of a sequence, a per-example loss) need no trace: Theta is [n1, n2].

Large n. `make_blocked_ntk_fn` assembles the [n, n] kernel from blocks of
`block_size` examples: only the upper-triangle block pairs are computed and
mirrored, so peak memory holds the Jacobians of two blocks, not of all n
examples. Block pairs are sharded over the given devices with
`jax.shard_map` on a one-axis `jax.sharding.Mesh`.

Test loss. Under linearised gradient flow with learning rate eta the residual
r(t) = f_t(X) - Y is expm(-eta Theta t) r0, and (docs/ntk.md)

    F(Theta, t) = || expm(-eta Theta t) r0 ||^2
                = sum_k exp(-2 eta lambda_k t) proj_k^2,   proj = U^T r0,

with Theta = U diag(lambda) U^T. `ntk_test_loss(eigvals, proj, eta, t)` is this
sum; `ntk_f_term(t, aux)` with aux = (eigvals, proj, eta) is the
`f_term` for `lensllm_jax.laws.lensllm_law`.

Evolution. `kernel_distance(a, b) = 1 - <A, B>_F / (||A||_F ||B||_F)` and
`NTKRecorder`, which records the kernel on a fixed probe set at chosen steps.

neural-tangents is imported through `lensllm_jax.theory.nt_compat` only.

Modules (each name is re-exported here: `from lensllm_jax.theory import ntk; ntk.NAME`):

  exact       the exact kernel of a parameter subset (`make_ntk_fn`, `param_mask_from_names`)
  sketched    the sketched kernel, memory O(n k + block), and its error bounds
  blocked     the [n, n] kernel from blocks of examples, sharded over devices (`empirical_ntk`)
  lm_outputs  per-example outputs of a language model (`lm_output_fn`)
  f_term      F(Theta, t) from the kernel's spectrum and the LensLLM law's F term
  recorder    kernel distance and the kernel recorded during fine-tuning

Their public names:

  exact: PyTree, ApplyFn, NTKFn, IMPLEMENTATIONS, DEFAULT_IMPLEMENTATION, param_mask_from_names,
    make_ntk_fn
  sketched: SKETCHES, make_sketched_ntk_fn, sketch_rms_error, ntk_test_loss_error_bound
  blocked: kernel_to_matrix, make_blocked_ntk_fn, empirical_ntk
  lm_outputs: LM_OUTPUTS, lm_output_fn
  f_term: NTKSpectrum, ntk_spectrum, ntk_mode_losses, ntk_test_loss, ntk_test_loss_from_kernel,
    ntk_f_term
  recorder: kernel_distance, NTKRecorder
"""

from lensllm_jax.theory.ntk import blocked, exact, f_term, lm_outputs, recorder, sketched
from lensllm_jax.theory.ntk.blocked import (
  empirical_ntk,
  kernel_to_matrix,
  make_blocked_ntk_fn,
)
from lensllm_jax.theory.ntk.exact import (
  DEFAULT_IMPLEMENTATION,
  IMPLEMENTATIONS,
  ApplyFn,
  NTKFn,
  PyTree,
  make_ntk_fn,
  param_mask_from_names,
)
from lensllm_jax.theory.ntk.f_term import (
  NTKSpectrum,
  ntk_f_term,
  ntk_mode_losses,
  ntk_spectrum,
  ntk_test_loss,
  ntk_test_loss_from_kernel,
)
from lensllm_jax.theory.ntk.lm_outputs import (
  LM_OUTPUTS,
  lm_output_fn,
)
from lensllm_jax.theory.ntk.recorder import (
  NTKRecorder,
  kernel_distance,
)
from lensllm_jax.theory.ntk.sketched import (
  SKETCHES,
  make_sketched_ntk_fn,
  ntk_test_loss_error_bound,
  sketch_rms_error,
)

__all__ = [
  "exact",
  "sketched",
  "blocked",
  "lm_outputs",
  "f_term",
  "recorder",
  "PyTree",
  "ApplyFn",
  "NTKFn",
  "IMPLEMENTATIONS",
  "DEFAULT_IMPLEMENTATION",
  "param_mask_from_names",
  "make_ntk_fn",
  "SKETCHES",
  "make_sketched_ntk_fn",
  "sketch_rms_error",
  "ntk_test_loss_error_bound",
  "kernel_to_matrix",
  "make_blocked_ntk_fn",
  "empirical_ntk",
  "LM_OUTPUTS",
  "lm_output_fn",
  "NTKSpectrum",
  "ntk_spectrum",
  "ntk_mode_losses",
  "ntk_test_loss",
  "ntk_test_loss_from_kernel",
  "ntk_f_term",
  "kernel_distance",
  "NTKRecorder",
]
