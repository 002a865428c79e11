"""Prior-fitted networks (PFNs) for fine-tuning curves: Bayesian extrapolation of log L(D).

CurvePFN (one curve in context)

A prior-fitted network (PFN) for fine-tuning curves: Bayesian extrapolation of log L(D).

The idea is that of LC-PFN (Adriaensen et al., NeurIPS 2023), written here for
this project's laws: a small transformer is trained ONLY on synthetic curves
drawn from a prior over fine-tuning laws; given the visible points of one curve
and a query size D it outputs a predictive distribution of log L(D), which
approximates the Bayesian posterior predictive under that prior.

Prior (`sample_prior_curves`, `PriorConfig`). Every curve lives on the public
grid D in {0, 200, 400, ..., 1638400} (15 points; the study grid 0..25600 is
its prefix). log L is scale-free for all the laws below (multiplying B and E by
c shifts log L by log c), and the network only sees log L relative to the last
visible point, so the overall level is irrelevant and set to 1. Families (one
per curve, weights `family_weights`):

  lensllm    L = B / (F + D^beta) + E                  (= the rectified law)
  dynamic    L = B / (F(D) + D^beta) + E,  F(D) = F0 (rho + (1 - rho) e^(-D / D_c))
             (the NTK-dynamics law of `dynamic_law.py`: F decays as the
              fine-tuning set grows)
  vanilla    L = (B / D^beta + E)^alpha                (D > 0; L(0) see the gap)
  bnsl       L = E + b (D + 1)^(-c0) (1 + ((D + 1) / d1)^(1 / f))^(-c1 f)
             (a broken power law with one break, Caballero et al. 2023: a slow
              pre-power phase of slope c0, then slope c0 + c1 -- the two-phase
              picture of AtS)

Ranges (all log-uniform "logU" unless said; chosen from what the parameters
mean and broad published ranges, never fitted to a curve file):
  * data exponents beta, c0 + c1: logU(0.05, 1.5) -- the data-scaling
    exponents reported for pre-training (0.05-0.3) and fine-tuning (up to ~1)
    with margin; c0 ~ U(0, 0.1) (a near-flat pre-power phase).
  * transition size D_t = F^(1 / beta), d1, D_c: logU(1, 1e8) -- from "before
    the first point" to "beyond D*" (the grid spans 200..1.6e6).
  * floor fraction E / L(0): U(0, 0.9) (bnsl: half the curves have E = 0, a
    pure power law at large D as AtS assumes); vanilla alpha: logU(0.5, 2).
  * dynamic: rho ~ U(0, 1) (how much of F survives), D_c as D_t.
  * zero-shot gap: the loss at D = 0 is that of the law times e^g with,
    per curve, g = 0 (prob 0.3), g ~ logU(0.01, 2) (prob 0.6: the drop of a
    format/task adaptation in the first few hundred samples, up to a factor
    e^2) or g ~ -logU(0.01, 0.3) (prob 0.1). Vanilla is undefined at 0: its
    L(0) is L(200) e^|g| with g always drawn from the positive part.
  * noise: log L += N(0, sigma^2), sigma ~ logU(1e-3, 0.05) per curve (test
    losses of a few hundred samples; the study's early-stopped runs); with
    prob 0.1 one point gets an extra N(0, (5 sigma)^2) outlier.
  * curves whose log L spans more than `max_log_range` (3.5 nats) over D > 0
    are redrawn (the bar distribution below has a finite support).

Network (`CurvePFN`). Context tokens are the visible points (x, y, is-zero-shot)
with x = log(D / 200) / log(8192) (0..1 on the grid; the zero-shot point has
x = -0.25 and the flag) and y = log L - log L(D_last), D_last the largest
visible D > 0. Query tokens carry x only. Each pre-LN layer lets every token
attend to the context tokens (queries never see each other or themselves), then
an MLP. The head gives logits over `num_bins` bins of z = log L(D) - log L(D_last)
on [z_min, z_max] (`BarDistribution`, the Riemann distribution of LC-PFN:
piecewise-constant density), trained by the negative log-likelihood of the
true z of every hidden point (`train`, optax AdamW, one seed).

Uses float32 (a network); the bar-distribution summaries are float64 numpy.

ContextPFN (the other models' curves in context)

A context PFN: Bayesian extrapolation of one curve given the other candidates' curves.

CurvePFN predicts log L(D) of a model from its own visible points only.
Here the prediction of a target model also reads the visible curves of the
other candidate models of the same file (a set: permutation-invariant, any
number of models), and the network is trained on a HIERARCHICAL prior in which
the models of one file share file-level structure, so that the other curves
carry information about the target's continuation (e.g. all models of a task
reaching their power phase at similar sizes, or bigger models having a larger
exponent). Only synthetic draws are used for training.

Hierarchical prior (`HierarchyConfig`, `sample_prior_files`). Decided from the
laws of CurvePFN and first principles before any public file was read
for this model; the single-curve ranges are `PriorConfig`'s, unchanged.
One draw is a FILE of M models on the public grid:
  * M ~ U{4, ..., 32} (selection files list tens of candidates; the padded
    batch holds 32), model sizes log10 N ~ U(7, 10.5) independently (from
    10M-parameter models to ~30B) and s = log10 N - 8.75 (decades from the
    middle of that range).
  * Every law parameter q of `family_log_loss` (beta, transition,
    floor, rho, decay_size, alpha, c0, sharpness, has_floor) and the
    zero-shot gap magnitude is drawn through its quantile u in (0, 1) of the
    single-curve range: logit u_i = m_q + a_q s_i + tau_q eps_i with, per file
    and parameter, m_q ~ Logistic(0, 1) (so with a = tau = 0 each u is uniform
    and a curve's parameter has the single-curve prior's marginal), the size
    slope a_q ~ N(0, 0.5^2) per decade (over the 3.5 decades, up to a few
    logits: a clear trend with size, of either sign) and the spread
    tau_q ~ logU(0.05, 2) (from near-identical models to models almost as
    different as independent draws, logistic sd 1.8); eps_i ~ N(0, 1).
  * Family: with prob 0.7 one family (drawn with `family_weights`) for the
    whole file, else each model its own.
  * Zero-shot gap kind (none / positive / negative, `gap_probs`): with prob
    0.5 one kind for the file, else per model; magnitudes through the
    hierarchy above on the single-curve ranges.
  * Level: the single-curve laws are normalised to L(0) = 1 (vanilla:
    L(200) = 1); here log L_i += -c s_i + tau_L eps_i with c ~ U(-0.05, 0.3)
    nats per decade (a pre-training N exponent of ~0.076 gives 0.18 nats per
    decade; fine-tuned task losses may differ either way) and
    tau_L ~ logU(0.01, 0.5).
  * Noise: one sd per file ~ logU(1e-3, 0.05) (one test set for all models)
    times e^(0.3 eps_i) per model; outliers as in the single-curve prior.
  * A model whose log L spans more than `max_log_range` is redrawn (the file
    keeps the first M valid models of 2M + 4 drawn).
  * Budget: every model of a file shows the same visible prefix (the
    protocol's views), k ~ U{1, ..., 13} fine-tuning points plus the zero-shot
    point; each visible point but the last is dropped w.p. `drop_prob`.

Network (`ContextPFN`, `ContextModelConfig`). The trunk is `CurvePFN`
(4 layers, width 64, 256 bars on z = log L - log L(D_last)); each trunk layer
also attends, through a gated attention (gate tanh(g), g initialised at
`set_gate_init` = 0.1, `Layer`), to one token per OTHER model of the
file. That token is an
MLP of (a) a summary of the other curve: its visible points encoded as in the
single-curve PFN, two self-attention layers, masked mean, and (b) the pair
features (log L_j(D_last) - log L_t(D_last) clipped to [-3, 3],
(log10 N_j - log10 N_t) / 2). No positional information: the prediction is
invariant to the order of the other models. The trunk starts from the
committed single-curve PFN (`init_from`), so at step 0 the context PFN is the
single-curve PFN plus 0.1 x the set attention, and training teaches it to use
the other curves. (A first run with the gates initialised at exactly 0 left
them closed: |tanh g| <= 0.03 after 3000 steps, and no gain over the
single-curve PFN on held-out prior files, since at g = 0 the set attention
gets no gradient; hence 0.1. Measured on prior draws only.)

Training budget (decided before evaluation): `configs/context_pfn.py`, seed 0,
batches of files drawn afresh each step, AdamW; size set by the ~25 min time
budget on the 2-core machine (the config says the step count and wall time).

Result (docs/context_pfn.md): on held-out prior files the committed model is
as accurate as the single-curve PFN, not better (RMSE ratios 0.91-1.02 over
1-12 visible points); with every model visible up to the same budget, the
other prefixes carry little information about the target's continuation.

Uses float32 (a network); the prior is float64 numpy; summaries float64.

Modules (every public name is re-exported here: `from lensllm_jax.plus import pfn; pfn.NAME`):

  prior             the priors: single curves and whole files (hierarchical)
  bars              the bar distribution over log L (the networks' output)
  network           CurvePFN and ContextPFN, their configs and input encodings
  training          training on fresh prior draws (`train`, `train_context`, `fit_bar_model`)
  predictor         trained networks as predictors of log L(D)
  checkpoint        save / load a predictor; the packaged weights
  selection_adapter the PFNs as selection methods (`curve_pfn_selection`, `context_pfn_selection`)

Their public names:

  prior: PUBLIC_GRID, FAMILIES, PriorConfig, independent_draws, family_log_loss,
    sample_prior_curves, observation_noise, HIERARCHICAL, SIZE_CENTER, HierarchyConfig,
    sample_prior_files
  bars: PredictiveSummary, BarDistribution
  network: X_SCALE, ZERO_SHOT_X, ModelConfig, Layer, CurvePFN, encode_x, encode_context,
    ContextModelConfig, encode_file, ContextPFN
  training: TrainConfig, make_batch, make_optimizer, fit_bar_model, train, make_file_batch,
    init_context_params, train_context
  predictor: CurvePFNPredictor, ContextPFNPredictor
  checkpoint: save_predictor, dataclass_from_dict, load_predictor, CURVE_PFN_WEIGHTS,
    default_curve_predictor, CONTEXT_PFN_WEIGHTS, default_context_predictor
  selection_adapter: CURVE_PFN_NAME, curve_pfn_selection, selection_result, CONTEXT_PFN_NAME,
    context_pfn_selection
"""

from lensllm_jax.plus.pfn import (
  bars,
  checkpoint,
  network,
  predictor,
  prior,
  selection_adapter,
  training,
)
from lensllm_jax.plus.pfn.bars import (
  BarDistribution,
  PredictiveSummary,
)
from lensllm_jax.plus.pfn.checkpoint import (
  CONTEXT_PFN_WEIGHTS,
  CURVE_PFN_WEIGHTS,
  dataclass_from_dict,
  default_context_predictor,
  default_curve_predictor,
  load_predictor,
  save_predictor,
)
from lensllm_jax.plus.pfn.network import (
  X_SCALE,
  ZERO_SHOT_X,
  ContextModelConfig,
  ContextPFN,
  CurvePFN,
  Layer,
  ModelConfig,
  encode_context,
  encode_file,
  encode_x,
)
from lensllm_jax.plus.pfn.predictor import (
  ContextPFNPredictor,
  CurvePFNPredictor,
)
from lensllm_jax.plus.pfn.prior import (
  FAMILIES,
  HIERARCHICAL,
  PUBLIC_GRID,
  SIZE_CENTER,
  HierarchyConfig,
  PriorConfig,
  family_log_loss,
  independent_draws,
  observation_noise,
  sample_prior_curves,
  sample_prior_files,
)
from lensllm_jax.plus.pfn.selection_adapter import (
  CONTEXT_PFN_NAME,
  CURVE_PFN_NAME,
  context_pfn_selection,
  curve_pfn_selection,
  selection_result,
)
from lensllm_jax.plus.pfn.training import (
  TrainConfig,
  fit_bar_model,
  init_context_params,
  make_batch,
  make_file_batch,
  make_optimizer,
  train,
  train_context,
)

__all__ = [
  "prior",
  "bars",
  "network",
  "training",
  "predictor",
  "checkpoint",
  "selection_adapter",
  "PUBLIC_GRID",
  "FAMILIES",
  "PriorConfig",
  "independent_draws",
  "family_log_loss",
  "sample_prior_curves",
  "observation_noise",
  "HIERARCHICAL",
  "SIZE_CENTER",
  "HierarchyConfig",
  "sample_prior_files",
  "PredictiveSummary",
  "BarDistribution",
  "X_SCALE",
  "ZERO_SHOT_X",
  "ModelConfig",
  "Layer",
  "CurvePFN",
  "encode_x",
  "encode_context",
  "ContextModelConfig",
  "encode_file",
  "ContextPFN",
  "TrainConfig",
  "make_batch",
  "make_optimizer",
  "fit_bar_model",
  "train",
  "make_file_batch",
  "init_context_params",
  "train_context",
  "CurvePFNPredictor",
  "ContextPFNPredictor",
  "save_predictor",
  "dataclass_from_dict",
  "load_predictor",
  "CURVE_PFN_WEIGHTS",
  "default_curve_predictor",
  "CONTEXT_PFN_WEIGHTS",
  "default_context_predictor",
  "CURVE_PFN_NAME",
  "curve_pfn_selection",
  "selection_result",
  "CONTEXT_PFN_NAME",
  "context_pfn_selection",
]
