"""The model zoo: registry entry points and the benchmark presets.

The presets' parameter counts are checked against an independent number: the
``size`` column of the public curve files (the counts the curves' authors
published for the real checkpoints).
"""

from __future__ import annotations

import csv

import jax
import pytest

from lensllm_jax import models
from lensllm_jax.models import registry

# Families (curve files' "family" column) whose models are decoder-only presets here.
DECODER_ONLY_FAMILIES = {"GPT2", "LaMini", "Cerebras", "OPT", "Phi"}


def _curve_sizes(shared_benchmarks) -> dict[str, tuple[int, str]]:
  """HF id -> (size, family) over both curve files (which must agree)."""
  out = {}
  for name in ("flan.csv", "gigaword.csv"):
    with open(shared_benchmarks / name, newline="") as f:
      for row in csv.DictReader(f):
        entry = (int(row["size"]), row["family"])
        assert out.setdefault(row["config name"], entry) == entry, (name, row["config name"])
  return out


def test_benchmark_presets_match_published_sizes(shared_benchmarks):
  sizes = _curve_sizes(shared_benchmarks)
  decoder_only = {k for k, (_, family) in sizes.items() if family in DECODER_ONLY_FAMILIES}
  # GPT-2 x4 + mGPT, LaMini-GPT x3, Cerebras-GPT x4, OPT x4, Phi x2.
  assert len(decoder_only) == 18
  # T5 x2, T5 v1.1, mT5 x2, Switch x3, BART x4 (counted as BartForCausalLM).
  assert len(sizes) == 30
  missing = sorted(set(sizes) - set(models.presets))
  assert not missing, f"no preset for {missing}"
  for model_id, (size, _) in sizes.items():
    config = models.presets[model_id]
    assert models.num_params(config) == size, model_id
    assert config.is_encoder_decoder == (model_id not in decoder_only
                                         and not model_id.startswith("facebook/bart")), model_id


@pytest.mark.parametrize("model_id", ["cerebras/Cerebras-GPT-111M", "facebook/opt-350m",
                                      "microsoft/phi-2", "google/switch-base-8",
                                      "facebook/bart-base"])
def test_preset_count_equals_the_built_module(model_id, shared_benchmarks):
  # num_params (closed form) against the shapes Flax actually creates (no memory used).
  config = models.presets[model_id]
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  size = _curve_sizes(shared_benchmarks)[model_id][0]
  assert models.count_params(shapes) == models.num_params(config) == size
  assert set(shapes) == set(models.block_names(config))


def test_registry_dispatch_and_errors():
  config = models.presets["tiny-llama"]
  assert isinstance(models.build(config), models.CausalLM)
  assert not config.is_encoder_decoder
  assert set(models.ARCHITECTURES) >= {"gpt2", "llama", "opt", "phi", "t5", "mt5", "switch",
                                       "bart"}
  assert set(models.HF_FORMATS) >= {"gpt2", "llama", "opt", "phi", "t5", "mt5",
                                    "switch_transformers", "bart"}
  with pytest.raises(models.CheckpointError,
                     match=r"'bert'.*bart, gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, "
                           r"mt5, opt, phi, phi3, qwen2, qwen3, switch_transformers, t5"):
    models.config_from_hf({"model_type": "bert"})

  class Unknown:
    arch = "mamba"

  with pytest.raises(ValueError, match=r"'mamba'.*gpt2"):
    models.build(Unknown())
  with pytest.raises(ValueError, match="already registered"):
    models.register_architecture(registry.ARCHITECTURES["gpt2"])
  with pytest.raises(ValueError, match="already registered"):
    models.register_hf_format(registry.HF_FORMATS["llama"])


def test_flops_per_token_opt_and_phi_closed_form():
  # 6 N_mm + 12 L d T with N_mm written out by hand (d_ff = 4d: 12 d^2 per layer).
  opt = models.presets["facebook/opt-350m"]  # post-LN, 512-wide embeddings projected in/out
  n_mm = 12 * 24 * 1024**2 + 2 * 512 * 1024 + 50272 * 512  # layers, project_in/out, tied head
  assert models.flops_per_token(opt, 2048) == pytest.approx(6 * n_mm + 12 * 24 * 1024 * 2048,
                                                            rel=1e-12)
  phi = models.presets["microsoft/phi-2"]
  n_mm = 12 * 32 * 2560**2 + 51200 * 2560  # layers, untied head (the lookup is no matmul)
  assert models.flops_per_token(phi, 2048, training=False) == pytest.approx(
      2 * n_mm + 4 * 32 * 2560 * 2048, rel=1e-12)


def test_config_validation_of_the_new_fields():
  with pytest.raises(ValueError, match="pre_norm"):
    models.ModelConfig(arch="gpt2", pre_norm=False)
  with pytest.raises(ValueError, match="word_embed_dim"):
    models.ModelConfig(arch="phi", word_embed_dim=16)
  with pytest.raises(ValueError, match="rotary_dim"):
    models.ModelConfig(arch="phi", d_model=32, n_heads=4, rotary_dim=3)
  with pytest.raises(ValueError, match="rotary_dim"):
    models.ModelConfig(arch="opt", rotary_dim=8)
  # Derived fields follow a replaced width: phi-2's 32 rotary channels of 80 are kept only
  # when given; OPT-350m's embedding width follows d_model unless given.
  small = models.presets["microsoft/phi-2"].replace(d_model=64, n_heads=4)
  assert small.head_dim == 16 and small.rotary_dim == 8
  opt = models.presets["facebook/opt-350m"]
  assert opt.replace(d_model=64, n_heads=4).word_embed_dim == 64
  assert opt.replace(d_model=64, n_heads=4, word_embed_dim=32).final_norm is False
