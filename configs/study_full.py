r"""Full LensLLM study on 2 CPU cores (about an hour; results in results/study/).

  python -m experiments.lensllm_study --preset=full

Zoo: 8 models, GPT-2 and Llama style, widths 32 / 48 / 64 and 1-3 layers
(three sizes per family), pre-trained for 200 to 2000 steps on the
docstring-free half of the standard library. Tasks: code2name and translate
(lensllm_jax.study_tasks), D = 200 * 2^k, k = 0..7 (200 ... 25600; D* =
25600), early stopping. NTK on 32 probe examples, Hessians / PAC-Bayes for
one model per family along the code2name sweep.

On a GPU the same binary scales by editing this file: wider / deeper zoo
models, longer pre-training, max_len 128+, more probe examples and Hessian
models (see the README).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = "full"
  c.workdir = "runs/study_full"
  c.output_dir = "results/study"
  c.corpus = ml_collections.ConfigDict(dict(max_files=None, pretrain_fraction=0.3,
                                            chunk_chars=300))
  c.tokenizer_vocab = 512
  c.pretrain_max_len = 64
  c.zoo = [
      dict(name="gpt2-xs", arch="gpt2", d_model=32, n_layers=1, n_heads=2, pretrain_steps=2000),
      dict(name="gpt2-s", arch="gpt2", d_model=48, n_layers=2, n_heads=4, pretrain_steps=800),
      dict(name="gpt2-m-short", arch="gpt2", d_model=64, n_layers=2, n_heads=4,
           pretrain_steps=200),
      dict(name="gpt2-m", arch="gpt2", d_model=64, n_layers=2, n_heads=4, pretrain_steps=1500),
      dict(name="llama-xs", arch="llama", d_model=32, n_layers=1, n_heads=2, pretrain_steps=1500),
      dict(name="llama-s", arch="llama", d_model=48, n_layers=2, n_heads=4, pretrain_steps=400),
      dict(name="llama-m-short", arch="llama", d_model=64, n_layers=3, n_heads=4,
           pretrain_steps=200),
      dict(name="llama-m", arch="llama", d_model=64, n_layers=3, n_heads=4, pretrain_steps=1200),
  ]
  c.pretrain = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=50,
                                              batch_size=32, seed=0))
  c.tasks = ["code2name", "translate"]
  c.task_max_len = ml_collections.ConfigDict(dict(code2name=64, translate=32))
  c.max_body_chars = 160
  c.num_records = 28000
  c.num_validation = 256
  c.num_test = 512
  c.split_seed = 0
  c.subset_seed = 0
  c.subset_sizes = [200 * 2 ** k for k in range(8)]
  c.train = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, batch_size=32, eval_every=25, patience=2,
      eval_batch_size=128, epochs=2.0, min_steps=50, max_steps=400, seed=0))
  c.ntk = ml_collections.ConfigDict(dict(num_probe=32))
  c.hessian = ml_collections.ConfigDict(dict(
      models=["gpt2-s", "llama-s"], tasks=["code2name"], num_examples=64, lanczos_iters=16,
      pac_examples=8, pac_iters=8))
  c.selection = ml_collections.ConfigDict(dict(ratios=[4, 8, 16, 32], num_restarts=8,
                                               max_steps=500, seed=0))
  return c
