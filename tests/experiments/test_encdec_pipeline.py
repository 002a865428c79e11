"""The pipeline takes encoder-decoders: data, training, sweep, NTK, Hessian loss, selection.

Done-when of the encoder-decoder zoo: an offline sweep over decoder-only
(tiny GPT-2, tiny BartForCausalLM: the benchmark's BART) and encoder-decoder
(tiny T5) Hugging Face checkpoints, saved locally with save_pretrained, on a
local jsonl task, writes ONE curves.csv that experiments.reproduce_selection
reads (its correlations need at least 3 models).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import REPO_ROOT, import_torch_and_transformers
from lensllm_jax.curves import benchmarks
from lensllm_jax.training import textdata

# end-to-end (sweep, then the binaries on its outputs) with a Hugging Face T5
pytestmark = [pytest.mark.slow, pytest.mark.torch]
torch, transformers = import_torch_and_transformers()


def test_seq2seq_encoding_sends_input_to_encoder_and_target_to_decoder():
  tok = textdata.train_tokenizer(["the cat sat", "ka lo me fu", "a b c d e f g"] * 5,
                                 vocab_size=280)
  pad, eos = textdata.special_ids(tok)
  examples = [("ka lo =>", " the cat"), ("a b c d e f g h i j k l", " sat"), ("", "the")]
  data = textdata.encode_examples(examples, tok, 6, encoder_decoder=True)
  assert data.input_ids.shape == data.targets.shape == (3, 6)
  for i, (src, tgt) in enumerate(examples):
    src_ids = tok.encode(src, add_special_tokens=False).ids + [eos]
    tgt_ids = tok.encode(tgt, add_special_tokens=False).ids + [eos]
    src_ids, tgt_ids = src_ids[-6:], tgt_ids[:6]  # the input's end, the target's start
    n, m = len(src_ids), len(tgt_ids)
    np.testing.assert_array_equal(data.input_ids[i, :n], src_ids)
    np.testing.assert_array_equal(data.attention_mask[i], np.arange(6) < n)
    np.testing.assert_array_equal(data.targets[i, :m], tgt_ids)
    np.testing.assert_array_equal(data.loss_mask[i], (np.arange(6) < m).astype(np.float32))
    assert np.all(data.input_ids[i, n:] == pad) and np.all(data.targets[i, m:] == pad)
  assert data.attention_mask[1].all()  # a long input keeps its last 6 tokens


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """Tiny GPT-2 and T5 checkpoints + tokenizer.json, a local jsonl, the sweep binary."""
  root = tmp_path_factory.mktemp("encdec_sweep")
  records = textdata.synthetic_translation_records(700, seed=3)
  data_file = root / "task.jsonl"
  data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
  tok = textdata.train_tokenizer([r["src"] + " " + r["tgt"] for r in records], vocab_size=280)
  pad, eos = textdata.special_ids(tok)
  vocab = tok.get_vocab_size()
  torch.manual_seed(0)
  hf_models = {
      "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
          vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
          bos_token_id=eos, eos_token_id=eos)),
      "t5": transformers.T5ForConditionalGeneration(transformers.T5Config(
          vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
          relative_attention_num_buckets=8, pad_token_id=pad, eos_token_id=eos,
          decoder_start_token_id=pad, dropout_rate=0.0)),
      "bart": transformers.BartForCausalLM(transformers.BartConfig(
          vocab_size=vocab, d_model=16, decoder_layers=1, decoder_attention_heads=2,
          decoder_ffn_dim=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
          max_position_embeddings=32, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos,
          decoder_start_token_id=eos, dropout=0.0))}
  for name, model in hf_models.items():
    model.save_pretrained(root / name, safe_serialization=True)
    tok.save(str(root / name / "tokenizer.json"))
  config = root / "sweep_config.py"
  config.write_text(textwrap.dedent(f"""
      import ml_collections
      from configs.finetune_tiny import get_config as tiny

      def get_config(arg=None):
        c = tiny("smoke")
        c.task = "local"
        c.data_files = ml_collections.ConfigDict({{"train": {str(data_file)!r}}})
        c.save_finetuned = False
        c.ntk.num_probe = 2
        c.models = [
            ml_collections.ConfigDict(dict(name="tiny-gpt2-hf", family="GPT-2", preset="",
                                           hf_dir={str(root / "gpt2")!r}, init_seed=0,
                                           pretrain_steps=0)),
            ml_collections.ConfigDict(dict(name="tiny-t5-hf", family="T5", preset="",
                                           hf_dir={str(root / "t5")!r}, init_seed=0,
                                           pretrain_steps=0)),
            ml_collections.ConfigDict(dict(name="tiny-bart-hf", family="BART", preset="",
                                           hf_dir={str(root / "bart")!r}, init_seed=0,
                                           pretrain_steps=0))]
        return c
      """))
  workdir = root / "work"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run([sys.executable, "-m", "experiments.finetune_sweep",
                         f"--config={config}", f"--workdir={workdir}"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, hf_models


def test_sweep_over_decoder_and_encoder_decoder_writes_one_curve_file(sweep, tmp_path):
  workdir, hf_models = sweep
  curves = benchmarks.load_curves(str(workdir / "curves.csv"))
  assert curves.models == ("tiny-gpt2-hf", "tiny-t5-hf", "tiny-bart-hf")
  assert curves.families == ("GPT-2", "T5", "BART")
  np.testing.assert_array_equal(curves.data_sizes, [0, 200, 400])
  # The size column is the checkpoint's own parameter count (torch's, tied weights once).
  assert list(curves.sizes) == [sum(p.numel() for p in m.parameters())
                                for m in hf_models.values()]
  assert np.all(np.isfinite(curves.losses)) and np.all(curves.losses > 0)
  # Fine-tuning the encoder-decoder lowers its target loss below zero-shot.
  assert curves.losses[1, 2] < curves.losses[1, 0]
  runs = [json.loads(x) for x in (workdir / "runs.jsonl").read_text().splitlines()]
  t5_runs = [r for r in runs if r["model"] == "tiny-t5-hf" and r["data_size"] > 0]
  assert len(t5_runs) == 2
  for r in t5_runs:
    assert r["train_flops"] > 0 and 0 < r["scored_tokens"]
    ntk = np.load(r["ntk"]["file"])  # the NTK of the target log-likelihood
    assert ntk["theta_finetuned"].shape == (2, 2)
    assert np.all(ntk["f_pretrained"] <= 0)
  # experiments.reproduce_selection reads the file the sweep wrote.
  from configs import selection as selection_config
  from experiments import reproduce_selection as rs

  cfg = selection_config.get_config()
  cfg.update(benchmarks=(str(workdir / "curves.csv"),),
             methods=("ZeroShot", "SubTuning", "ModelSize"), ratios=(2,), budget=dict(enabled=False),
             figures=False)
  out = rs.run(cfg, tmp_path / "selection")
  with open(out / "selection.csv", newline="") as f:
    rows = [line.split(",") for line in f.read().splitlines()[1:]]
  assert {r[3] for r in rows} == {"ZeroShot", "SubTuning", "ModelSize"}
  assert {r[0] for r in rows} == {"curves"}
