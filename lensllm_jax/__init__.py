"""lensllm_jax: LensLLM (Zeng et al., ICML 2025) and its baselines in JAX.

Importing the package does no I/O and changes no global JAX setting.
"""

__version__ = "0.1.0"
