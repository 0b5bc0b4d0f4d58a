"""Distillation losses: token-level KD against a direct full-softmax computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import distill_losses as dl
from doa_jax.losses import cross_entropy_loss, normalized_loss_weights


def _batch(seed=0, b=3, length=5, vocab=11):
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, vocab, size=(b, length))
    targets[0, 3:] = 0
    batch = {'decoder_target_tokens': jnp.asarray(targets)}
    batch['loss_weights'] = normalized_loss_weights(batch, None)
    student = jnp.asarray(rng.normal(size=(b, length, vocab)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(b, length, vocab)) * 2, jnp.float32)
    return batch, student, teacher


def _direct_kl(student, teacher, weights, t):
    p = np.exp(np.asarray(jax.nn.log_softmax(teacher / t)))
    logp = np.log(p)
    logq = np.asarray(jax.nn.log_softmax(student / t))
    return float(np.sum((t * t) * np.sum(p * (logp - logq), -1) * np.asarray(weights)))


@pytest.mark.parametrize('t', [1.0, 2.0])
def test_topk_covering_vocab_equals_full_softmax(t):
    batch, student, teacher = _batch()
    logp = jax.nn.log_softmax(teacher)
    vals, ids = jax.lax.top_k(logp, teacher.shape[-1])
    offline = dict(batch, teacher_topk_ids=ids, teacher_topk_logprobs=vals)
    loss, aux = dl.token_kd_loss(temperature=t)(student, offline)
    want = _direct_kl(student, teacher, batch['loss_weights'], t)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux['kd_loss']), want, rtol=1e-5)
    online, _ = dl.token_kd_loss(temperature=t)(student, dict(batch, teacher_logits=teacher))
    np.testing.assert_allclose(float(online), want, rtol=1e-5)


def test_topk_truncated_differs_and_is_finite():
    batch, student, teacher = _batch(1)
    vals, ids = jax.lax.top_k(jax.nn.log_softmax(teacher), 3)
    loss, _ = dl.token_kd_loss()(student, dict(batch, teacher_topk_ids=ids, teacher_topk_logprobs=vals))
    assert np.isfinite(float(loss))
    full = _direct_kl(student, teacher, batch['loss_weights'], 2.0)
    assert abs(float(loss) - full) > 1e-4


def test_kd_zero_when_student_matches_teacher():
    batch, _, teacher = _batch(2)
    loss, _ = dl.token_kd_loss()(teacher, dict(batch, teacher_logits=teacher))
    assert abs(float(loss)) < 1e-5


def test_alpha_mixing_and_gold_rows():
    batch, student, teacher = _batch(3)
    b = dict(batch, teacher_logits=teacher)
    ce, _ = cross_entropy_loss(z_loss=0.0)(student, batch)
    kd, _ = dl.token_kd_loss(alpha=0.0)(student, b)
    mixed, _ = dl.token_kd_loss(alpha=0.25)(student, b)
    np.testing.assert_allclose(float(mixed), 0.25 * float(ce) + 0.75 * float(kd), rtol=1e-5)
    all_gold, aux = dl.token_kd_loss(alpha=0.0)(student, dict(b, is_gold=jnp.ones(3, bool)))
    np.testing.assert_allclose(float(all_gold), float(ce), rtol=1e-5)
    assert float(aux['kd_loss']) == 0.0


def test_positions_without_teacher_take_cross_entropy():
    """An offline row of NO_TEACHER_ID (a pseudo-label's EOS the teacher never decoded) takes
    cross entropy; every other position keeps the KD term, whatever alpha mixes in."""
    from doa_jax.losses import cross_entropy_with_z_loss
    batch, student, teacher = _batch(5)
    vals, ids = jax.lax.top_k(jax.nn.log_softmax(teacher), teacher.shape[-1])
    missing = np.zeros(ids.shape[:2], bool)
    missing[1, 2] = missing[2, 4] = True
    ids = jnp.where(missing[..., None], dl.NO_TEACHER_ID, ids)
    vals = jnp.where(missing[..., None], 0.0, vals)
    offline = dict(batch, teacher_topk_ids=ids, teacher_topk_logprobs=vals)
    ce, _ = cross_entropy_with_z_loss(student, batch['decoder_target_tokens'], 0.0, 0.0)
    kd = dl.token_kl(student, dict(batch, teacher_logits=teacher), 2.0)
    w = batch['loss_weights']
    for alpha in (0.0, 0.3):
        want = jnp.sum(jnp.where(missing, ce, alpha * ce + (1 - alpha) * kd) * w)
        got, aux = dl.token_kd_loss(alpha=alpha)(student, offline)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        np.testing.assert_allclose(float(aux['kd_loss']),
                                   float(jnp.sum(jnp.where(missing, 0.0, kd) * w)), rtol=1e-5)


def test_sequence_kd_is_cross_entropy_on_targets():
    batch, student, _ = _batch(4)
    a, _ = dl.sequence_kd_loss(z_loss=0.0)(student, batch)
    b, _ = cross_entropy_loss(z_loss=0.0)(student, batch)
    assert float(a) == float(b)


def test_bad_inputs_are_named():
    batch, student, teacher = _batch()
    with pytest.raises(KeyError, match='teacher_topk_ids'):
        dl.token_kd_loss()(student, batch)
    with pytest.raises(ValueError, match='share a vocabulary'):
        dl.token_kd_loss()(student, dict(batch, teacher_logits=teacher[..., :5]))
    with pytest.raises(ValueError, match='vocab_size 512 != student vocab_size 32128'):
        dl.check_same_vocab(512, 32128)
    with pytest.raises(ValueError, match='temperature'):
        dl.token_kd_loss(temperature=0.0)


def test_online_teacher_matches_explicit_teacher_logits():
    from flax import linen as nn
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    config = get_config('t5_1_1_tiny')
    enc = jnp.asarray(np.random.default_rng(0).integers(2, 500, (2, 7)), jnp.int32)
    tgt = jnp.asarray([[5, 6, 1, 0], [7, 1, 0, 0]], jnp.int32)
    dec = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
    params = T5(config).init(jax.random.PRNGKey(1), enc, dec)['params']
    batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec, 'decoder_target_tokens': tgt}
    batch['loss_weights'] = normalized_loss_weights(batch, None)
    teacher = T5(config).apply({'params': nn.unbox(params)}, enc, dec, tgt)
    student = jnp.asarray(np.random.default_rng(2).normal(size=teacher.shape), jnp.float32)
    got, _ = jax.jit(dl.online_teacher_kd_loss(params, config))(student, batch)
    want, _ = dl.token_kd_loss()(student, dict(batch, teacher_logits=teacher))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-3)  # jit vs eager rounding
    with pytest.raises(ValueError, match='vocab_size 512 != student vocab_size 300'):
        dl.online_teacher_kd_loss(params, config)(student[..., :300], batch)


def test_online_teacher_params_are_a_step_argument_not_constants():
    """The trainer's step takes the teacher's parameters as an argument: its program holds no
    teacher-sized constant (the closure form, which the check catches, holds all of them), and
    its loss equals the closure form's on the same tiny teacher and student."""
    import optax
    from flax import linen as nn

    from doa_jax import partitioning
    from doa_jax.models.config import get_config
    from doa_jax.models.t5 import T5
    from doa_jax.train_state import abstract_train_state, init_train_state
    from doa_jax.train_step import make_train_step, model_apply_fn, zero_metrics
    config = get_config('t5_1_1_tiny', dtype=jnp.float32)
    model = T5(config)
    init = jax.jit(lambda r: model.init(r, jnp.ones((1, 7), jnp.int32),
                                        jnp.ones((1, 4), jnp.int32))['params'])
    teacher = jax.tree.map(np.asarray, nn.unbox(init(jax.random.PRNGKey(1))))
    teacher_size = sum(x.size for x in jax.tree.leaves(teacher))
    loss_fn = dl.online_teacher_kd_loss(teacher, config, alpha=0.25)
    closure = lambda logits, batch: loss_fn(logits, batch)    # hides `.teacher`: the old form

    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), jax.devices()[:1])
    rules, opt = partitioning.STANDARD_RULES, optax.sgd(1e-3)
    _, shardings = abstract_train_state(init, opt, mesh, rules, jax.random.PRNGKey(3))
    state = init_train_state(init, opt, shardings, jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    tgt = np.asarray([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)
    batch = {'encoder_input_tokens': rng.integers(2, 500, (2, 7)).astype(np.int32),
             'decoder_input_tokens': np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
             'decoder_target_tokens': tgt, 'decoder_loss_weights': (tgt > 0).astype(np.int32)}
    metrics = zero_metrics()
    step, old_step = (make_train_step(model_apply_fn(model), fn, opt, mesh, rules, shardings,
                                      use_dropout=False) for fn in (loss_fn, closure))
    placed = loss_fn.teacher.place(mesh, rules)

    def const_elements(fn, *args):
        return sum(np.size(c) for c in fn.trace(*args).jaxpr.consts)

    assert const_elements(step, state, batch, metrics, placed) < teacher_size / 100
    assert const_elements(old_step, state, batch, metrics) >= teacher_size
    # The lowered program reads every teacher leaf as an argument.
    args = jax.tree.leaves(step.trace(state, batch, metrics, placed).lower().args_info)
    assert len(args) == len(jax.tree.leaves((state, batch, metrics, teacher)))

    @jax.jit
    def closure_loss(params):
        b = dict(batch, loss_weights=normalized_loss_weights(batch, None))
        return closure(model_apply_fn(model)(params, b, None), b)[0]

    want = closure_loss(state.params)
    _, got = step(state, batch, metrics, placed)
    np.testing.assert_allclose(float(got['loss']), float(want), rtol=1e-5)
