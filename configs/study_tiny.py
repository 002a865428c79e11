r"""Tiny LensLLM study: the whole pipeline in about a minute (CI, tests/test_study.py).

  python -m experiments.lensllm_study --preset=tiny

Four very small models (two GPT-2, two Llama; one shape per family, pre-trained
for 12 or 0 steps) on 120 standard-library files, both tasks, D = 25 * 2^k up to
800. The numbers mean nothing; the test checks that every step runs and
writes finite values.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = "tiny"
  c.workdir = "runs/study_tiny"
  c.output_dir = "runs/study_tiny/results"
  c.corpus = ml_collections.ConfigDict(dict(max_files=120, pretrain_fraction=0.5,
                                            chunk_chars=200))
  c.tokenizer_vocab = 300
  c.pretrain_max_len = 24
  # One shape per family; "-b" models are not pre-trained (0 steps). Pre-training
  # uses the fine-tuning TrainConfig and sequence length, so it shares the
  # compiled train step: compilation is most of the tiny run's time.
  c.zoo = [
      dict(name="gpt2-a", arch="gpt2", d_model=24, n_layers=1, n_heads=2, pretrain_steps=12),
      dict(name="gpt2-b", arch="gpt2", d_model=24, n_layers=1, n_heads=2, pretrain_steps=0,
           init_seed=1),
      dict(name="llama-a", arch="llama", d_model=24, n_layers=1, n_heads=2, pretrain_steps=12),
      dict(name="llama-b", arch="llama", d_model=24, n_layers=1, n_heads=2, pretrain_steps=0,
           init_seed=1),
  ]
  c.pretrain = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=2, end_lr_fraction=1.0, batch_size=16, eval_every=4,
      patience=2, eval_batch_size=48, seed=0))
  c.tasks = ["code2name", "translate"]
  c.task_max_len = ml_collections.ConfigDict(dict(code2name=24, translate=24))
  c.max_body_chars = 100
  c.num_records = 1200  # translate records; code2name uses all functions it finds
  c.num_validation = 32
  c.num_test = 48
  c.split_seed = 0
  c.subset_seed = 0
  c.subset_sizes = [25, 50, 100, 200, 400, 800]
  # Fine-tuning: steps = clip(ceil(epochs * D / batch), min_steps, max_steps) rounded up to
  # eval_every; early stopping on the validation split (patience evaluations).
  c.train = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=2, batch_size=16, eval_every=4, patience=2,
      eval_batch_size=48, epochs=1.0, min_steps=4, max_steps=12, seed=0))
  c.ntk = ml_collections.ConfigDict(dict(num_probe=8))
  # Hessian / PAC-Bayes along the sweep: these models on the first task.
  c.hessian = ml_collections.ConfigDict(dict(
      models=["gpt2-a"], tasks=["code2name"], num_examples=16, lanczos_iters=6,
      pac_examples=2, pac_iters=4, blocks=["h_0"]))
  c.selection = ml_collections.ConfigDict(dict(ratios=[2, 4], num_restarts=2, max_steps=100,
                                               seed=0))
  return c
