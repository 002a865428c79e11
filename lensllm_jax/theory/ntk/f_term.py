"""The NTK test loss F(Theta, t) = ||expm(-eta Theta t) r0||^2 and the LensLLM law's F term.

With Theta = U diag(lambda) U^T and proj = U^T r0,
F(Theta, t) = sum_k exp(-2 eta lambda_k t) proj_k^2 (float64 through `eigh`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class NTKSpectrum(NamedTuple):
  """Eigendecomposition of a kernel and a residual, float64.

  eigvals: [n] ascending, clipped at 0.
  eigvecs: [n, n] columns u_k.
  proj: [n] u_k^T r0.
  """
  eigvals: jax.Array
  eigvecs: jax.Array
  proj: jax.Array


def ntk_spectrum(theta: jax.Array, r0: jax.Array) -> NTKSpectrum:
  """float64 eigendecomposition of a symmetric PSD kernel and projections of r0.

  Theta = U diag(lambda) U^T via `jnp.linalg.eigh` on the symmetrised
  (Theta + Theta^T) / 2 in float64 (inside `jax.enable_x64`); eigenvalues
  below 0 (round-off of a PSD matrix) are clipped to 0.

  Args:
    theta: [n, n] kernel (e.g. `kernel_to_matrix` of an untraced kernel).
    r0: [n] initial residual f_0(X) - Y.

  Returns:
    NTKSpectrum(eigvals [n], eigvecs [n, n], proj [n]), float64.
  """
  with jax.enable_x64(True):
    theta = jnp.asarray(theta, jnp.float64)
    r0 = jnp.asarray(r0, jnp.float64)
    if theta.ndim != 2 or theta.shape[0] != theta.shape[1]:
      raise ValueError(f"theta must be a square [n, n] matrix, got shape {theta.shape}")
    if r0.shape != theta.shape[:1]:
      raise ValueError(f"r0 must have shape [{theta.shape[0]}], got {r0.shape}")
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (theta + theta.T))
    return NTKSpectrum(jnp.maximum(eigvals, 0.), eigvecs, eigvecs.T @ r0)


def ntk_mode_losses(eigvals: jax.Array, proj: jax.Array, eta, t) -> jax.Array:
  """Per-eigendirection terms of F: exp(-2 eta lambda_k t) proj_k^2.

  Args:
    eigvals: [n] kernel eigenvalues (>= 0).
    proj: [n] projections u_k^T r0.
    eta: learning rate (scalar).
    t: training time, any shape [...].

  Returns:
    [..., n] float64 (computed inside `jax.enable_x64`, also under jit);
    sums over the last axis to `ntk_test_loss`.
  """
  with jax.enable_x64(True):
    eigvals, proj, eta, t = (jnp.asarray(a, jnp.float64) for a in (eigvals, proj, eta, t))
    return jnp.exp(-2. * eta * t[..., None] * eigvals) * jnp.square(proj)


def ntk_test_loss(eigvals: jax.Array, proj: jax.Array, eta, t) -> jax.Array:
  """F(t) = sum_k exp(-2 eta lambda_k t) proj_k^2 = ||expm(-eta Theta t) r0||^2.

  float64 (inside `jax.enable_x64`). Jit-able, differentiable in t (and eta,
  eigvals, proj), vectorised over t.

  Args:
    eigvals: [n] eigenvalues of Theta (>= 0), e.g. `ntk_spectrum(...).eigvals`.
    proj: [n] projections U^T r0.
    eta: learning rate (scalar).
    t: time, any shape [...].

  Returns:
    F with the shape of t, float64.
  """
  with jax.enable_x64(True):
    return jnp.sum(ntk_mode_losses(eigvals, proj, eta, t), axis=-1)


def ntk_test_loss_from_kernel(theta: jax.Array, r0: jax.Array, eta, t) -> jax.Array:
  """Convenience: F(Theta, t) from the kernel [n, n] and residual [n]; float64."""
  spec = ntk_spectrum(theta, r0)
  return ntk_test_loss(spec.eigvals, spec.proj, eta, t)


def ntk_f_term(t, aux) -> jax.Array:
  """`f_term(t, aux)` for `lensllm_jax.laws.lensllm_law`: aux = (eigvals, proj, eta).

  aux is one curve's (eigvals [n], proj [n], eta []); `fit_curves(..., aux=...)`
  takes the same tuple with a leading [curves] axis on each entry.
  """
  eigvals, proj, eta = aux
  return ntk_test_loss(eigvals, proj, eta, t)
