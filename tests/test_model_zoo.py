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
  missing = sorted(decoder_only - set(models.presets))
  assert not missing, f"no preset for {missing}"
  checked = 0
  for model_id, (size, _) in sizes.items():
    if model_id in models.presets:  # every preset of a benchmark model, whatever its family
      assert models.num_params(models.presets[model_id]) == size, model_id
      checked += 1
  assert checked >= len(decoder_only)


@pytest.mark.parametrize("model_id", ["cerebras/Cerebras-GPT-111M", "facebook/opt-350m",
                                      "microsoft/phi-2"])
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
  assert set(models.ARCHITECTURES) >= {"gpt2", "llama", "opt", "phi"}
  assert set(models.HF_FORMATS) >= {"gpt2", "llama", "opt", "phi"}
  with pytest.raises(models.CheckpointError, match=r"'bert'.*gpt2, llama, opt, phi"):
    models.config_from_hf({"model_type": "bert"})

  class Unknown:
    arch = "mamba"

  with pytest.raises(ValueError, match=r"'mamba'.*gpt2"):
    models.build(Unknown())
  with pytest.raises(ValueError, match="already registered"):
    models.register_architecture(registry.ARCHITECTURES["gpt2"])
  with pytest.raises(ValueError, match="already registered"):
    models.register_hf_format(registry.HF_FORMATS["llama"])
