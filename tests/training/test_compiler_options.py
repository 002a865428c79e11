"""The per-program XLA compiler options (lensllm_jax.xla_workarounds.jit) of the project's
programs: they reach XLA, only on the CPU backend, only at top level, keyed by the
persistent compilation cache, and the programs compiled with them give the numbers of
XLA's default compilation."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lensllm_jax import models, xla_workarounds
from lensllm_jax.models import registry
from lensllm_jax.theory import ntk
from lensllm_jax.training import loop, sweep, textdata

CONFIG = models.ModelConfig(arch="gpt2", vocab_size=40, max_len=12, d_model=16, n_layers=1,
                            n_heads=2)
TCFG = loop.TrainConfig(learning_rate=1e-2, warmup_steps=1, batch_size=4, max_steps=3)
BOGUS = {"xla_no_such_option_lensllm": 1}


def _data(n=4, seed=0) -> textdata.TokenizedData:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, CONFIG.vocab_size, (n, CONFIG.max_len + 1)).astype(np.int32)
  mask = np.ones((n, CONFIG.max_len), bool)
  return textdata.TokenizedData(ids[:, :-1], ids[:, 1:], mask.astype(np.float32), mask)


def _mlp(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _programs():
  """{program: (build, run)}: build() makes the jitted program from its factory (reading
  CPU_COMPILER_OPTIONS now), run(fn) its outputs (leaves) on fixed inputs."""
  params = models.init_params(CONFIG, jax.random.key(0))
  apply_fn = loop.causal_lm_apply(models.build(CONFIG))
  batch = textdata.as_batch(_data())
  optimizer = loop.make_optimizer(TCFG)
  # (Adam would turn gradients at rounding level into steps of +-learning rate.)
  sgd = optax.sgd(1.0)
  x = sweep.probe_inputs(_data(), CONFIG)
  keys = jax.random.split(jax.random.key(1), 3)
  mlp_params = {"w1": jax.random.normal(keys[0], (5, 7)), "w2": jax.random.normal(keys[1], (7, 3))}
  mlp_x = jax.random.normal(keys[2], (6, 5))

  def train_run(step):  # one SGD step of rate 1: the new params are params - gradient
    state, metrics = step(loop.init_state(params, sgd), batch, jax.random.key(0))
    return jax.tree.map(jnp.subtract, params, state.params), metrics

  return {
      "init": (lambda: registry._jitted_init.__wrapped__(CONFIG, 8),
               lambda f: f(jax.random.key(3))),
      "state_init": (lambda: loop._jit_init_state.__wrapped__(optimizer), lambda f: f(params)),
      "train_step": (lambda: loop.make_train_step(apply_fn, sgd), train_run),
      "eval_step": (lambda: loop.make_eval_step(apply_fn), lambda f: f(params, batch)),
      # (A two-layer network: the LM's kernel program takes ~5 s to compile twice.)
      "ntk_kernel": (lambda: ntk.make_ntk_fn(_mlp), lambda f: f(mlp_params, mlp_x)),
      "ntk_output": (lambda: sweep._ntk_fns.__wrapped__(CONFIG, "log_likelihood")[1],
                     lambda f: f(params, x)),
  }


@pytest.fixture(scope="module")
def programs():
  return _programs()


def test_every_program_is_wired(programs):
  assert sorted(programs) == sorted(xla_workarounds.PROGRAMS)
  assert set(xla_workarounds.CPU_COMPILER_OPTIONS) <= set(xla_workarounds.PROGRAMS)


@pytest.mark.parametrize("program", xla_workarounds.PROGRAMS)
def test_options_reach_xla(programs, program, monkeypatch):
  """An option XLA does not know fails that program's compilation, and only that one's."""
  build, run = programs[program]
  monkeypatch.setitem(xla_workarounds.CPU_COMPILER_OPTIONS, program, BOGUS)
  with pytest.raises(Exception, match="xla_no_such_option_lensllm"):
    run(build())
  other = next(p for p in xla_workarounds.PROGRAMS if p != program)
  assert xla_workarounds.cpu_compiler_options(other) == (
      xla_workarounds.CPU_COMPILER_OPTIONS.get(other) or None)


@pytest.mark.parametrize("program", sorted(xla_workarounds.CPU_COMPILER_OPTIONS))
def test_outputs_equal_xla_defaults(programs, program, monkeypatch):
  """The options chosen give XLA's default compilation's numbers: bit for bit where
  xla_workarounds says so (BIT_IDENTICAL), else within float32 rounding."""
  build, run = programs[program]
  assert xla_workarounds.cpu_compiler_options(program)  # the options are on (CPU)
  got = [np.asarray(a) for a in jax.tree.leaves(run(build()))]
  monkeypatch.delitem(xla_workarounds.CPU_COMPILER_OPTIONS, program)
  assert xla_workarounds.cpu_compiler_options(program) is None
  want = [np.asarray(a) for a in jax.tree.leaves(run(build()))]
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    if program in xla_workarounds.BIT_IDENTICAL:
      assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
    else:  # float32 rounding: relative to each output's scale
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(w))))


def test_cpu_only(monkeypatch):
  """On another default backend no option is passed (XLA's defaults), here shown by a
  program whose CPU options would not compile."""
  monkeypatch.setitem(xla_workarounds.CPU_COMPILER_OPTIONS, "init", BOGUS)
  with pytest.raises(Exception, match="xla_no_such_option_lensllm"):
    xla_workarounds.jit(jnp.sin, program="init")(1.0)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_workarounds.cpu_compiler_options("init") is None
  assert float(xla_workarounds.jit(jnp.sin, program="init")(1.0)) == pytest.approx(np.sin(1.0))
  with pytest.raises(ValueError, match="program='nope'"):
    xla_workarounds.cpu_compiler_options("nope")


def test_nested_in_other_traces():
  """JAX refuses compiler options on a nested jit: inside jit, eval_shape, vmap and grad
  the program is the plain jit, with the same values."""
  assert xla_workarounds.cpu_compiler_options("init")
  f = xla_workarounds.jit(lambda x: jnp.sin(x) * x, program="init")
  x = jnp.arange(3.0)
  want = np.sin(np.arange(3.0)) * np.arange(3.0)
  np.testing.assert_allclose(f(x), want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(f)(x), want, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(x), want, rtol=1e-6)
  assert jax.eval_shape(f, x).shape == (3,)
  np.testing.assert_allclose(jax.grad(lambda v: f(v).sum())(x),
                             np.cos(np.arange(3.0)) * np.arange(3.0) + np.sin(np.arange(3.0)),
                             rtol=1e-6)


@pytest.mark.slow
def test_persistent_cache_keys_the_options(tmp_path):
  """A program compiled with the options and the same program without them are two
  entries of the persistent cache; the first is read back by a later compile with the
  options (a fresh process: no in-memory cache)."""
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp
      jax.config.update("jax_compilation_cache_dir", {str(tmp_path / "cache")!r})
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
      from lensllm_jax import xla_workarounds
      hits = []
      jax.monitoring.register_event_listener(
          lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
      def f(x):
        return jnp.tanh(x) @ x.T
      import sys
      mode = sys.argv[1]
      fn = xla_workarounds.jit(f, program="init") if mode == "options" else jax.jit(f)
      x = jnp.ones((4, 4)).block_until_ready()  # its programs' hits not counted
      before = len(hits)
      fn(x).block_until_ready()
      print(len(hits) - before)
  """)

  def run(mode):
    proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])

  def entries():
    return sorted(p.name for p in (tmp_path / "cache").iterdir()
                  if p.name.startswith("jit_f-") and p.name.endswith("-cache"))

  assert run("options") == 0
  first = entries()
  assert len(first) == 1
  assert run("plain") == 0  # not the options' program
  assert len(entries()) == 2
  assert run("options") == 1  # read back
  assert len(entries()) == 2
