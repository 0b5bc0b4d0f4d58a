"""The trainer on one CPU device: overfitting, callbacks, stop/NaN handling, losses, bad input."""

from __future__ import annotations

import glob

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

import tasks.toy  # noqa: F401  registers doa_toy
from doa_jax import callbacks, flops, losses, optimizers, partitioning, train_data, trainer
from doa_jax.models.config import T5Config, get_config
from doa_jax.models.t5 import T5
from doa_jax.train_state import abstract_train_state, init_train_state
from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics

LENGTHS = {'inputs': 48, 'targets': 8}
TINY = get_config('t5_1_1_tiny', dtype=jnp.float32)


class Recorder(callbacks.TrainerCallback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, *, model_dir, start_step, mesh):
        self.calls.append(('start', start_step))

    def on_steps_end(self, *, first_step, last_step, seconds):
        assert seconds > 0
        self.calls.append(('steps', first_step, last_step))

    def on_compile(self, *, seconds):
        self.calls.append(('compile',))

    def on_eval_end(self, *, step, seconds):
        self.calls.append(('eval', step))

    def on_checkpoint(self, *, step):
        self.calls.append(('checkpoint', step))

    def on_train_end(self, *, step, reason):
        self.calls.append(('end', step, reason))


def _train(model_dir, steps, **kw):
    args = dict(model_dir=str(model_dir), model_config=TINY, mixture_or_task_name='doa_toy',
                task_feature_lengths=LENGTHS, train_steps=steps, batch_size=8,
                optimizer=optimizers.make_optimizer('adamw', 3e-3), log_period=5,
                checkpoint_period=30, show_progress=False)
    args.update(kw)
    return trainer.train(**args)


@pytest.mark.slow
@pytest.mark.fault_injection
def test_overfits_then_stops_and_nan_keeps_last_checkpoint(tmp_path):
    rec = Recorder()
    result = _train(tmp_path, 60, eval_period=30, callbacks=[rec])
    first, last = result.history[0]['loss'], result.history[-1]['loss']
    assert last <= 0.2 * first, f'loss fell only from {first:.3f} to {last:.3f}'
    assert result.reason == 'done' and result.step == 60
    assert result.history[-1]['eval/accuracy'] > 0.5

    intervals = [c[1:] for c in rec.calls if c[0] == 'steps']
    assert intervals == [(s + 1, s + 5) for s in range(0, 60, 5)]
    assert rec.calls[0] == ('start', 0) and rec.calls[1] == ('compile',)
    assert [c[1] for c in rec.calls if c[0] == 'checkpoint'] == [30, 60]
    assert [c[1] for c in rec.calls if c[0] == 'eval'] == [30, 60]
    assert rec.calls[-1] == ('end', 60, 'done')

    # TensorBoard events carry the t5x timing names and MFU.
    tags = set()
    for path in glob.glob(str(tmp_path / 'train' / 'events.*')):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {'timing/seqs_per_second', 'timing/target_tokens_per_second',
            'timing/compilation_seconds', 'timing/mfu', 'loss'} <= tags

    # A callback asking to stop: the trainer saves at that step and ends cleanly.
    rec = Recorder()
    stopped = _train(tmp_path, 90, callbacks=[rec, callbacks.StopAtStep(70)])
    assert (stopped.reason, stopped.step) == ('stopped', 70)
    assert rec.calls[0] == ('start', 60) and ('checkpoint', 70) in rec.calls
    assert rec.calls[-1] == ('end', 70, 'stopped')

    # NaN loss: an error naming the first bad step; the last good checkpoint stays the latest.
    def nan_loss(logits, batch):
        loss, aux = losses.cross_entropy_loss()(logits, batch)
        return loss * jnp.nan, aux

    rec = Recorder()
    with pytest.raises(trainer.NonFiniteLossError, match='step 71'):
        _train(tmp_path, 90, loss_fn=nan_loss, callbacks=[rec])
    assert rec.calls[-1] == ('end', 75, 'error')
    ckpts = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert ckpts[-1] == 70


def _one_device_step_setup(opt):
    """(mesh, model, state shardings, initial state, one toy batch) for driving the train step."""
    mesh = partitioning.make_mesh()
    model = T5(TINY)

    def init_params(rng):
        return model.init(rng, jnp.ones((1, 48), jnp.int32), jnp.ones((1, 8), jnp.int32))['params']

    _, shardings = abstract_train_state(init_params, opt, mesh, partitioning.STANDARD_RULES,
                                        jax.random.PRNGKey(0))
    ds = train_data.host_dataset('doa_toy', LENGTHS, 'train', 8, seed=0)
    batch = train_data.to_global(next(train_data.numpy_batches(ds)), mesh, 8)
    state = init_train_state(init_params, opt, shardings, jax.random.PRNGKey(0))
    return mesh, model, shardings, state, batch


def test_gradient_accumulation_matches_full_batch():
    opt = optax.sgd(0.1)
    mesh, model, shardings, state0, batch = _one_device_step_setup(opt)
    out = {}
    for micro in (1, 4):
        state = jax.tree.map(jnp.copy, state0)     # the step donates its input state
        step = make_train_step(model_apply_fn(model), losses.cross_entropy_loss(), opt, mesh,
                               partitioning.STANDARD_RULES, shardings, num_microbatches=micro,
                               use_dropout=False)
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch, zero_metrics())
        out[micro] = (jax.device_get(metrics), jax.device_get(state.params))
    np.testing.assert_allclose(out[4][0]['loss'], out[1][0]['loss'], rtol=1e-5)
    assert out[4][0]['num_tokens'] == out[1][0]['num_tokens']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), out[4][1], out[1][1])


def test_nonfinite_step_keeps_state():
    """A step whose loss is NaN leaves parameters and optimizer moments bit-identical (the update
    runs under a conditional) and records its step; a finite step then updates them."""
    opt = optimizers.make_optimizer('adamw', 1e-2)
    mesh, model, shardings, state, batch = _one_device_step_setup(opt)
    before = jax.device_get((state.params, state.opt_state))

    def nan_loss(logits, b):
        loss, aux = losses.cross_entropy_loss()(logits, b)
        return loss * jnp.nan, aux

    args = (mesh, partitioning.STANDARD_RULES, shardings)
    bad = make_train_step(model_apply_fn(model), nan_loss, opt, *args, use_dropout=False)
    good = make_train_step(model_apply_fn(model), losses.cross_entropy_loss(), opt, *args,
                           use_dropout=False)
    with jax.set_mesh(mesh):
        state, metrics = bad(state, batch, zero_metrics())
        kept = jax.device_get((state.params, state.opt_state))
        jax.tree.map(np.testing.assert_array_equal, kept, before)
        assert int(metrics['nonfinite_step']) == 0 and int(state.step) == 1
        state, metrics = good(state, batch, metrics)
    moved = jax.device_get(state.params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), moved,
                                           before[0]))
    assert all(changed), 'a finite step must update every parameter'
    assert int(metrics['nonfinite_step']) == 0     # the first bad step stays recorded


def test_cross_entropy_matches_optax_and_smoothing_and_normalizing():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, 11, size=(2, 5)), jnp.int32).at[1, 3:].set(0)
    batch = {'decoder_target_tokens': targets, 'decoder_loss_weights': (targets > 0).astype(jnp.int32)}
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = np.asarray(targets > 0, np.float32)
    batch['loss_weights'] = losses.normalized_loss_weights(batch, None)
    loss, aux = losses.cross_entropy_loss(z_loss=0.0)(logits, batch)
    np.testing.assert_allclose(loss, np.sum(ref * w) / w.sum(), rtol=1e-6)
    assert aux['num_tokens'] == w.sum()
    # Per-sequence averaging and a constant factor.
    batch['loss_weights'] = losses.normalized_loss_weights(batch, 'AVERAGE_PER_SEQUENCE')
    loss, _ = losses.cross_entropy_loss(z_loss=0.0)(logits, batch)
    per_seq = np.sum(ref * w, axis=1) / w.sum(axis=1)
    np.testing.assert_allclose(loss, per_seq.mean(), rtol=1e-6)
    batch['loss_weights'] = losses.normalized_loss_weights(batch, 4.0)
    loss, _ = losses.cross_entropy_loss(z_loss=0.0)(logits, batch)
    np.testing.assert_allclose(loss, np.sum(ref * w) / 4.0, rtol=1e-6)
    # z-loss adds z * logsumexp^2; label smoothing of a perfect one-hot-like logit scores ~0.
    ce, zl = losses.cross_entropy_with_z_loss(logits, targets, 1e-4, 0.0)
    np.testing.assert_allclose(zl, 1e-4 * jax.nn.logsumexp(logits, -1) ** 2, rtol=1e-6)
    smooth = 0.1
    soft_logits = jnp.log(jax.nn.one_hot(targets, 11) * (1 - smooth - smooth / 10) + smooth / 10)
    ce, _ = losses.cross_entropy_with_z_loss(soft_logits, targets, 0.0, smooth)
    np.testing.assert_allclose(ce, 0.0, atol=1e-5)
    with pytest.raises(ValueError, match='LOSS_NORMALIZING_FACTOR'):
        losses.normalized_loss_weights(batch, 'PER_TOKEN')


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_gradient_matches_autodiff(smoothing):
    """The written-out gradient of cross entropy + z-loss equals autodiff of the plain formula
    (log-softmax against smoothed one-hot targets), for float32 and bf16 logits."""
    rng = np.random.default_rng(1)
    vocab = 37
    logits = jnp.asarray(rng.normal(size=(3, 4, vocab)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(3, 4)), jnp.int32)
    w_ce = jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32)
    w_z = jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32)

    def reference(x):
        x = x.astype(jnp.float32)
        log_z = jax.nn.logsumexp(x, axis=-1)
        off = smoothing / (vocab - 1)
        soft = jax.nn.one_hot(targets, vocab) * (1 - smoothing - off) + off
        ce = -jnp.sum(soft * (x - log_z[..., None]), axis=-1)
        return jnp.sum(ce * w_ce + 1e-2 * log_z ** 2 * w_z)

    def ours(x):
        ce, zl = losses.cross_entropy_with_z_loss(x, targets, 1e-2, smoothing)
        return jnp.sum(ce * w_ce + zl * w_z)

    # The values differ by the smoothed distribution's constant entropy only.
    delta = ours(logits) - reference(logits)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)
    if not smoothing:
        np.testing.assert_allclose(delta, 0.0, atol=1e-5)
    half = logits.astype(jnp.bfloat16)
    g = jax.grad(ours)(half)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), jax.grad(reference)(half).astype(jnp.float32),
                               atol=2e-3)


def test_schedules_and_optimizers():
    rsqrt = optimizers.make_schedule('rsqrt', 0.01, warmup_steps=100)
    np.testing.assert_allclose([rsqrt(0), rsqrt(99), rsqrt(399)], [0.01, 0.01, 0.005], rtol=1e-6)
    linear = optimizers.make_schedule('linear', 1.0, warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([linear(5), linear(10), linear(60), linear(110)],
                               [0.5, 1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match='TRAIN_STEPS'):
        optimizers.make_schedule('linear', 1.0, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match='adafactor'):
        optimizers.make_optimizer('sgd')
    # Adafactor keeps factored statistics for 2-D parameters (row and column vectors).
    state = optimizers.make_optimizer('adafactor').init({'w': jnp.zeros((256, 384))})
    shapes = {leaf.shape for leaf in jax.tree.leaves(state)}
    assert (256,) in shapes and (384,) in shapes and (256, 384) not in shapes


def test_train_flops_on_a_hand_count_and_against_xla():
    """Training FLOPs per sequence: a micro model counted product by product by hand, and a
    larger one against XLA's own count of its compiled gradient computation."""
    micro = T5Config(vocab_size=10, emb_dim=4, num_heads=1, head_dim=2, mlp_dim=3,
                     num_encoder_layers=1, num_decoder_layers=1)
    # Forward multiply-adds for 3 source and 2 target tokens (d 4, attention 1x2, MLP 3, gated):
    #   encoder  q, k, v, o 4 * 3*4*2 = 96; wi_0, wi_1 2 * 3*4*3 = 72; wo 3*3*4 = 36;
    #            scores and values 2 * 3*3*2 = 36                                         = 240
    #   decoder  self q, k, v, o 4 * 2*4*2 = 64; causal scores and values over half the 2x2
    #            pairs 2 * 2*2 = 8; cross q, o 2 * 2*4*2 = 32; cross k, v over the source
    #            2 * 3*4*2 = 48; cross scores and values 2 * 2*3*2 = 24; MLP 2 * 2*4*3 + 2*3*4
    #            = 72; LM head 2*4*10 = 80                                                 = 328
    # 568 multiply-adds = 1136 FLOPs forward; the backward pass costs twice the forward.
    assert flops.train_flops_per_sequence(micro, 3, 2) == 3 * 2 * 568
    # XLA counts every operation of the compiled gradient (norms, softmax, the causal mask's
    # other half too); the matmuls dominate at this size.
    config = T5Config(vocab_size=512, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024,
                      num_encoder_layers=2, num_decoder_layers=2, dtype=jnp.float32,
                      attention_impl='xla', matmul_impl='xla')
    model, enc, dec = T5(config), jnp.ones((1, 64), jnp.int32), jnp.ones((1, 32), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec)['params'])
    loss = lambda p: jnp.sum(jax.nn.log_softmax(model.apply({'params': p}, enc, dec, dec))[..., 0])
    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    counted = (cost[0] if isinstance(cost, list) else cost)['flops']
    assert flops.train_flops_per_sequence(config, 64, 32) == pytest.approx(counted, rel=0.03)
    # 1e12 FLOPs in 1 s on two devices of a 1e12 FLOP/s peak: half the peak.
    assert flops.mfu(1e12, 1.0, 2, 1e12) == 0.5


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"Unknown task or mixture 'no_such_task'.*doa_toy"):
        train_data.get_task('no_such_task')

    class FakeMesh:
        shape = {'data': 4, 'model': 2}

    with pytest.raises(ValueError, match=r'BATCH_SIZE=6 .* data axis size 4'):
        partitioning.check_batch_size(6, FakeMesh())
    with pytest.raises(ValueError, match='MESH_MODEL'):
        partitioning.make_mesh(partitioning.MeshConfig(model=3))


def test_overlong_examples_truncated_with_count_or_fail():
    short = {'inputs': 16, 'targets': 8}
    counter = train_data.OverlongCounter()
    ds = train_data.host_dataset('doa_toy', short, 'validation', 16, seed=0, shuffle=False,
                                 repeat=False, counter=counter)
    batch = next(train_data.numpy_batches(ds))
    assert batch['encoder_input_tokens'].shape == (16, 16)
    assert (batch['encoder_input_tokens'][:, -1] == 1).all()   # cut inputs still end in EOS
    assert counter.new_since_last() == 16     # every toy input is longer than 16 bytes
    ds = train_data.host_dataset('doa_toy', short, 'validation', 16, seed=0, shuffle=False,
                                 repeat=False, overlong='error')
    with pytest.raises(tf.errors.InvalidArgumentError, match='longer than TASK_FEATURE_LENGTHS'):
        next(train_data.numpy_batches(ds))


class _LookupDecoder:
    """A stand-in for the evaluator's `decoding.Decoder` that answers from the toy task's own
    examples (every `wrong_every`-th answer wrong)."""

    def __init__(self, wrong_every: int = 0):
        self.generate = _toy_lookup_generate(wrong_every)

    def load(self, params):
        return self

    def decode_batch(self, enc):
        return self.generate(None, None, enc, max_decode_length=8)


def _toy_lookup_generate(wrong_every: int = 0):
    """Greedy answers looked up in the toy task's own examples."""
    vocab = tasks.toy.VOCABULARY
    answers = {e['inputs']: e['targets'] for s in ('train', 'validation')
               for e in tasks.toy.toy_examples(s)}
    calls = []

    def generate(params, config, encoder_input_tokens, *, max_decode_length, method='greedy'):
        enc = np.asarray(encoder_input_tokens)
        out = np.zeros((enc.shape[0], max_decode_length), np.int32)
        for i, row in enumerate(enc):
            text = vocab.decode([int(t) for t in row if t > 1])
            answer = answers.get(text, '')
            if wrong_every and len(calls) % wrong_every == 0:
                answer = 'wrong'
            calls.append(text)
            ids = list(vocab.encode(answer))[:max_decode_length - 1] + [vocab.eos_id]
            out[i, :len(ids)] = ids
        return jnp.asarray(out), jnp.zeros((enc.shape[0],))

    return generate


def _toy_evaluator():
    """The evaluator over doa_toy's validation split, batch 8, decoding 8 tokens."""
    mesh = partitioning.make_mesh()
    model = T5(TINY)
    return mesh, model, trainer._Evaluator(
            TINY, model_apply_fn(model), losses.cross_entropy_loss(), mesh,
            partitioning.STANDARD_RULES, 'doa_toy', LENGTHS, 'validation', 8, None, True, 8, None, 0)


def test_decode_based_task_metrics_use_the_decoder_and_task_metric():
    mesh, model, ev = _toy_evaluator()
    batches = list(ev._batches())
    assert len(batches) == 2      # 16 validation examples, batch 8
    for wrong_every, expected in ((0, 100.0), (2, 50.0)):
        ev.decoder = _LookupDecoder(wrong_every)
        assert ev.task_metrics(None, batches) == {'task/accuracy': expected}


def test_repeated_evaluations_compile_the_decoder_once():
    """The evaluator decodes through one jitted `decoding.Decoder`: new parameters at every
    evaluation, one compilation for the eval batches' one shape, none after that."""
    mesh, model, ev = _toy_evaluator()
    batches = list(ev._batches())
    enc = jnp.ones((1, LENGTHS['inputs']), jnp.int32)
    predictions = []
    with jax.set_mesh(mesh):
        for seed in range(3):
            params = model.init(jax.random.PRNGKey(seed), enc, enc[:, :4])['params']
            ev.task_metrics(params, batches)
            # Its prepared weights are not kept beside the train state once it has decoded.
            assert ev.decoder.weights is None
            enc_global = train_data.to_global(batches[0], mesh, 8)['encoder_input_tokens']
            predictions.append(np.asarray(ev.decoder.load(params).decode_batch(enc_global)[0]))
    assert ev.decoder.compile_count == 1
    # The parameters did change between evaluations (otherwise one compile proves nothing).
    assert not np.array_equal(predictions[0], predictions[1])


def test_eval_warns_when_gold_is_truncated(caplog):
    mesh = partitioning.make_mesh()
    short = {'inputs': 64, 'targets': 2}
    ev = trainer._Evaluator(TINY, model_apply_fn(T5(TINY)), losses.cross_entropy_loss(), mesh,
                            partitioning.STANDARD_RULES, 'doa_toy', short, 'validation', 8, None,
                            True, 2, None, 0)
    with caplog.at_level('WARNING'):
        assert len(list(ev._batches())) == 2
    assert '16 validation examples of doa_toy are longer than' in caplog.text
    caplog.clear()
    ev.lengths = LENGTHS
    with caplog.at_level('WARNING'):
        list(ev._batches())
    assert 'longer than' not in caplog.text


def test_initial_checkpoint_is_loaded_and_checked(tmp_path, monkeypatch):
    import doa_jax.checkpoints as ckpts
    model = T5(TINY)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 48), jnp.int32),
                                               jnp.ones((1, 8), jnp.int32))['params'])
    from flax import linen as nn
    shapes = nn.unbox(shapes)
    loaded = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
    seen = []

    def load_checkpoint(path, config):
        seen.append((path, config))
        return loaded

    monkeypatch.setattr(ckpts, 'load_checkpoint', load_checkpoint, raising=False)
    result = _train(tmp_path / 'a', 5, initial_checkpoint_path='/ckpt/t5',
                    optimizer=optimizers.make_optimizer('adamw', 0.0))
    assert seen == [('/ckpt/t5', TINY)]
    jax.tree.map(lambda p: np.testing.assert_array_equal(p, np.float32(0.01)), result.state.params)

    bad = dict(loaded, token_embedder={'embedding': np.zeros((7, 32), np.float32)})
    monkeypatch.setattr(ckpts, 'load_checkpoint', lambda path, config: bad, raising=False)
    with pytest.raises(ValueError, match=r'token_embedder/embedding.*INITIAL_CHECKPOINT_PATH'):
        _train(tmp_path / 'b', 5, initial_checkpoint_path='/ckpt/t5')


def test_async_checkpoint_keeps_its_values_while_the_next_steps_run(tmp_path):
    """Checkpoint 4 is written in the background while steps 5-8 update (and donate) the state:
    it must hold exactly the state of a run that stopped at step 4."""
    _train(tmp_path / 'four', 4, checkpoint_period=4, shuffle=False)
    rec = Recorder()
    _train(tmp_path / 'eight', 8, checkpoint_period=4, log_period=1, shuffle=False,
           callbacks=[rec])
    # Each checkpoint is reported once, after its save completed, in order.
    assert [c[1] for c in rec.calls if c[0] == 'checkpoint'] == [4, 8]
    assert rec.calls.index(('checkpoint', 8)) == len(rec.calls) - 2   # then ('end', 8, 'done')

    def saved_state(run):
        import orbax.checkpoint as ocp
        return ocp.PyTreeCheckpointer().restore(str(tmp_path / run / 'checkpoints' / '4' / 'state'))

    got, want = saved_state('eight'), saved_state('four')
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
