"""Packed training rows (t5x's default): per-example logits, losses and gradients equal the
unpacked ones, attention never crosses examples, and the data pipeline and trainer pack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks.toy  # noqa: F401  registers doa_toy
from doa_jax import losses, train_data, trainer
from doa_jax.models.config import get_config
from doa_jax.models.t5 import T5, packing_inputs
from doa_jax.train_step import model_apply_fn

LENGTHS = {'inputs': 24, 'targets': 12}
# Three examples (token ids, EOS = 1) of different lengths; packed, they share one row.
EXAMPLES = [
    {'inputs': [5, 9, 12, 7, 1], 'targets': [8, 3, 1]},
    {'inputs': [4, 6, 1], 'targets': [10, 11, 13, 2, 1]},
    {'inputs': [14, 15, 16, 17, 18, 19, 1], 'targets': [20, 1]},
]


def _convert(examples, pack: bool, lengths=LENGTHS) -> dict[str, np.ndarray]:
    """The examples through seqio's EncDecFeatureConverter, as one numpy batch."""
    ds = tf.data.Dataset.from_generator(
            lambda: ({k: np.asarray(v, np.int32) for k, v in ex.items()} for ex in examples),
            output_signature={k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'targets')})
    ds = seqio.EncDecFeatureConverter(pack=pack)(ds, lengths)
    rows = list(ds.as_numpy_iterator())
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _model(impl: str = 'xla', scan: bool = False) -> tuple[T5, dict]:
    cfg = get_config('t5_1_1_tiny', dtype=jnp.float32, attention_impl=impl, scan_layers=scan)
    model = T5(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                        jnp.ones((1, 4), jnp.int32))['params']
    return model, params


def _logits(model, params, batch, positions: bool = False):
    return model.apply({'params': params}, batch['encoder_input_tokens'],
                       batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                       **packing_inputs(batch, positions=positions))


def _jit_logits(model, params, batch, positions: bool = False) -> np.ndarray:
    fn = jax.jit(lambda p, b: _logits(model, p, b, positions))
    return np.asarray(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def _per_example(packed: dict, logits: np.ndarray) -> list[np.ndarray]:
    """Each packed example's decoder logits, in example order."""
    out = []
    for row in range(packed['decoder_segment_ids'].shape[0]):
        seg = packed['decoder_segment_ids'][row]
        for s in range(1, seg.max() + 1):
            out.append(logits[row][seg == s])
    return out


def test_packing_puts_the_examples_in_one_row():
    packed = _convert(EXAMPLES, pack=True)
    assert packed['encoder_input_tokens'].shape == (1, LENGTHS['inputs'])
    assert packed['decoder_segment_ids'][0].max() == len(EXAMPLES)


@pytest.mark.parametrize('impl,scan,positions', [('xla', False, False), ('xla', True, False),
                                                 ('xla', False, True), ('auto', False, False)])
def test_packed_logits_per_example_equal_unpacked(impl, scan, positions):
    model, params = _model(impl, scan)
    unpacked = _convert(EXAMPLES, pack=False)
    packed = _convert(EXAMPLES, pack=True)
    want = _jit_logits(model, params, unpacked)
    got = _per_example(packed, _jit_logits(model, params, packed, positions))
    for i, ex in enumerate(EXAMPLES):
        n = len(ex['targets'])
        np.testing.assert_allclose(got[i], want[i, :n], rtol=2e-5, atol=2e-5,
                                   err_msg=f'example {i}')


def test_attention_never_crosses_examples():
    """Changing one packed example's tokens leaves the other examples' logits bit-identical."""
    model, params = _model()
    packed = _convert(EXAMPLES, pack=True)
    other = [dict(EXAMPLES[0]), {'inputs': [30, 31, 32], 'targets': [33, 34, 35, 36, 1]},
             dict(EXAMPLES[2])]
    changed = _convert(other, pack=True)
    for k in ('encoder_segment_ids', 'decoder_segment_ids'):
        np.testing.assert_array_equal(packed[k], changed[k])
    a = _per_example(packed, _jit_logits(model, params, packed))
    b = _per_example(changed, _jit_logits(model, params, changed))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.allclose(a[1], b[1])


def test_packed_rows_keep_the_shared_bias():
    """Without per-token positions the relative-position bias is gathered once, (heads, q, k),
    for every row, packed or not; per-token positions gather one per row."""
    model, params = _model()
    packed = {k: np.concatenate([v, v]) for k, v in _convert(EXAMPLES, pack=True).items()}
    shared = str(jax.make_jaxpr(lambda p: _logits(model, p, packed))(params))
    per_row = str(jax.make_jaxpr(lambda p: _logits(model, p, packed, positions=True))(params))
    h, q = model.config.num_heads, LENGTHS['inputs']
    assert f'f32[{h},{q},{q}]' in shared and f'f32[{h},2,{q},{q}]' not in shared
    assert f'f32[{h},2,{q},{q}]' in per_row


@pytest.mark.parametrize('factor', [None, losses.AVERAGE_PER_SEQUENCE])
def test_packed_loss_and_gradients_equal_unpacked(factor):
    model, params = _model()
    apply = model_apply_fn(model)
    loss_fn = losses.cross_entropy_loss(z_loss=1e-4)

    def loss_of(p, batch):
        batch = dict(batch)
        batch['loss_weights'] = losses.normalized_loss_weights(batch, factor)
        loss, aux = loss_fn(apply(p, batch, None), batch)
        return loss, aux

    unpacked = {k: jnp.asarray(v) for k, v in _convert(EXAMPLES, pack=False).items()}
    packed = {k: jnp.asarray(v) for k, v in _convert(EXAMPLES, pack=True).items()}
    grad_fn = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
    (want, want_aux), want_g = grad_fn(params, unpacked)
    (got, got_aux), got_g = grad_fn(params, packed)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got_aux['num_tokens']) == float(want_aux['num_tokens']) == 10
    assert float(got_aux['correct']) == float(want_aux['correct'])
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


def test_cached_decoding_refuses_packed_rows():
    model, params = _model()
    packed = _convert(EXAMPLES, pack=True)
    with pytest.raises(ValueError, match='unpacked'):
        model.apply({'params': params}, None, packed['encoder_input_tokens'],
                    packed['decoder_input_tokens'][:, :1], decode=True, max_decode_length=4,
                    encoder_segment_ids=packed['encoder_segment_ids'],
                    decoder_segment_ids=packed['decoder_segment_ids'][:, :1],
                    method=T5.decode, mutable=['cache'])


def test_host_dataset_packs_and_carries_segment_ids():
    lengths = {'inputs': 96, 'targets': 16}
    unpacked = train_data.host_dataset('doa_toy', lengths, 'train', 8, seed=0, shuffle=False,
                                       repeat=False)
    packed = train_data.host_dataset('doa_toy', lengths, 'train', 2, seed=0, shuffle=False,
                                     repeat=False, pack=True)
    rows = list(train_data.numpy_batches(unpacked))
    prows = list(train_data.numpy_batches(packed))
    assert 'decoder_segment_ids' not in rows[0]
    assert set(train_data.SEGMENT_FEATURES) <= set(prows[0])
    real = sum(int((b['decoder_target_tokens'] > 0).sum()) for b in rows)
    assert real == sum(int((b['decoder_target_tokens'] > 0).sum()) for b in prows)
    n_rows = sum(b['encoder_input_tokens'].shape[0] for b in rows)
    n_packed = sum(b['encoder_input_tokens'].shape[0] for b in prows)
    assert n_packed <= n_rows / 2    # 32 examples of 20-45 input tokens in 96-token rows


def test_trainer_trains_packed_rows(tmp_path):
    from doa_jax import optimizers
    result = trainer.train(model_dir=str(tmp_path), model_config=get_config(
            't5_1_1_tiny', dtype=jnp.float32), mixture_or_task_name='doa_toy',
            task_feature_lengths=None, default_feature_lengths={'inputs': 96, 'targets': 16},
            train_steps=20, batch_size=4, optimizer=optimizers.make_optimizer('adamw', 3e-3),
            log_period=10, checkpoint_period=20, eval_period=20, eval_steps=1, pack=True,
            show_progress=False)
    first, last = result.history[0]['loss'], result.history[-1]['loss']
    assert last < 0.5 * first, (first, last)
    assert 'eval/accuracy' in result.history[-1]


@pytest.mark.slow
def test_train_benchmark_reports_the_nonpadding_share(tmp_path):
    """`benchmark train --task` times the task's own batch and reports how much of it is real
    tokens; packing raises that share."""
    import json

    from doa_jax.benchmark.__main__ import main
    shares = {}
    for pack in (False, True):
        out = tmp_path / f'train_{pack}.json'
        args = ['train', '--config=t5_1_1_tiny', '--task=doa_toy', '--task_module=tasks.toy',
                '--batch_size=4', '--source_len=96', '--target_len=16', '--steps=1',
                '--warmup=0', '--dtype=float32', f'--json={out}'] + (['--pack'] if pack else [])
        assert main(args) == 0
        (r,) = json.loads(out.read_text())['results']
        assert r['packed'] is pack and r['batch_source'] == 'task doa_toy'
        ds = train_data.host_dataset('doa_toy', {'inputs': 96, 'targets': 16}, 'train', 4,
                                     seed=0, pack=pack)
        b = next(train_data.numpy_batches(ds))
        real = (b['encoder_input_tokens'] > 0).sum() + (b['decoder_target_tokens'] > 0).sum()
        assert r['nonpad_token_share'] == pytest.approx(real / (4 * (96 + 16)))
        shares[pack] = r['nonpad_token_share']
    # doa_toy's examples fill well under half of a padded row; packed rows about 0.8 of theirs.
    assert shares[False] < 0.4 < 0.7 < shares[True]
