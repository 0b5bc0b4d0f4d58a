"""Checkpoint interop: HF import/export, t5x legacy (msgpack + zarr) and Orbax, CLI, bad input."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import checkpoints
from doa_jax.checkpoints.errors import CheckpointMismatchError
from doa_jax.checkpoints.hf import UnsupportedCheckpointError, load_hf, save_hf
from doa_jax.models import get_config
from doa_jax.models.t5 import T5
from tests.hf_reference import build_hf_t5

ENC = np.random.RandomState(0).randint(2, 300, (2, 11))
DEC = np.concatenate([np.zeros((2, 1), int), ENC[:, :6]], axis=1)


def _hf_logits(model, enc=ENC, dec=DEC):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def _ours(params, cfg, enc=ENC, dec=DEC):
    return np.asarray(T5(cfg).apply({'params': params}, enc, dec))


@pytest.mark.parametrize('tied,ff,weights', [(False, 'gated-gelu', 'safetensors'),
                                             (True, 'relu', 'bin')])
def test_import_hf_directory_matches_reference(tmp_path, tied, ff, weights):
    ref = build_hf_t5(tied=tied, feed_forward_proj=ff, vocab_size=300, d_model=32, d_kv=12,
                      d_ff=48, num_layers=2, num_heads=4)
    if weights == 'safetensors':
        ref.save_pretrained(tmp_path)
    else:   # transformers 5 writes only safetensors; older checkpoints on the hub are .bin
        import torch

        ref.config.save_pretrained(tmp_path)
        torch.save(ref.state_dict(), tmp_path / 'pytorch_model.bin')
    assert (tmp_path / ('model.safetensors' if weights == 'safetensors'
                        else 'pytorch_model.bin')).is_file()
    params, cfg = load_hf(tmp_path, dtype=jnp.float32)
    assert cfg.logits_via_embedding == tied and cfg.head_dim * cfg.num_heads != cfg.emb_dim
    np.testing.assert_allclose(_ours(params, cfg), _hf_logits(ref), atol=1e-4)
    # The same directory through the format-detecting loader, into a scanned layout.
    scanned = checkpoints.load_checkpoint(tmp_path, cfg.replace(scan_layers=True))
    assert scanned['encoder']['layers']['attention']['query']['kernel'].shape[0] == 2


@pytest.mark.parametrize('name', ['t5_1_1_tiny', 't5_tiny'])
def test_export_hf_loads_in_transformers_and_reproduces_logits(tmp_path, name):
    import transformers

    cfg = get_config(name, dtype=jnp.float32)
    enc = ENC % cfg.vocab_size
    params = nn.unbox(T5(cfg).init(jax.random.PRNGKey(1), enc, DEC)['params'])
    save_hf(params, cfg, tmp_path)
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    if cfg.logits_via_embedding:
        assert model.lm_head.weight is model.shared.weight
    else:
        assert model.lm_head.weight is not model.shared.weight
    np.testing.assert_allclose(_hf_logits(model, enc), _ours(params, cfg, enc), atol=1e-4)
    back, back_cfg = load_hf(tmp_path, dtype=jnp.float32)
    assert back_cfg == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def _tiny_params(name='t5_1_1_tiny', seed=2):
    cfg = get_config(name, dtype=jnp.float32)
    tokens = jnp.ones((1, 4), jnp.int32)
    return cfg, jax.tree_util.tree_map(np.asarray, nn.unbox(
            T5(cfg).init(jax.random.PRNGKey(seed), tokens, tokens)['params']))


def test_t5x_legacy_checkpoint_in_real_on_disk_format(tmp_path):
    import msgpack

    cfg, params = _tiny_params()
    ckpt_dir = checkpoints.write_t5x_legacy(params, tmp_path, step=1000)
    # The real layout: a msgpack file whose big leaves are relative zarr tensorstore specs.
    contents = msgpack.unpackb((ckpt_dir / 'checkpoint').read_bytes(), raw=False,
                               strict_map_key=False)
    spec = contents['optimizer']['target']['token_embedder']['embedding']
    assert spec['driver'] == 'zarr'
    assert spec['kvstore']['path'] == 'target.token_embedder.embedding'
    assert (ckpt_dir / 'target.token_embedder.embedding' / '.zarray').is_file()
    # Loading from the parent picks the latest step.
    checkpoints.write_t5x_legacy(jax.tree_util.tree_map(lambda x: x * 0, params), tmp_path, 10)
    assert checkpoints.detect_format(tmp_path) == 't5x'
    loaded = checkpoints.load_checkpoint(tmp_path, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    np.testing.assert_array_equal(_ours(loaded, cfg, ENC % 512), _ours(params, cfg, ENC % 512))


def test_orbax_checkpoints_t5x_style_and_cli_convert(tmp_path):
    import orbax.checkpoint as ocp

    from doa_jax.checkpoints.__main__ import main

    cfg, params = _tiny_params()
    # t5x's Orbax layout keeps the parameters under `target` next to the optimizer state.
    ocp.PyTreeCheckpointer().save(str(tmp_path / 'run' / 'checkpoint_7'),
                                  {'target': params, 'state': {'step': np.int32(7)}})
    loaded = checkpoints.load_checkpoint(tmp_path / 'run', cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    # CLI: t5x legacy -> Orbax -> HF.
    checkpoints.write_t5x_legacy(params, tmp_path / 'legacy', step=3)
    assert main(['convert', '--from', 't5x', str(tmp_path / 'legacy'), '--to',
                 str(tmp_path / 'converted'), '--model', 't5_1_1_tiny']) == 0
    converted = checkpoints.load_checkpoint(tmp_path / 'converted', cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
    assert main(['export-hf', str(tmp_path / 'converted'), '--to', str(tmp_path / 'hf'),
                 '--model', 't5_1_1_tiny']) == 0
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['d_kv'] == 12


def test_loading_a_trainer_run_directory(tmp_path):
    from doa_jax.checkpoints import RunCheckpointer
    from doa_jax.train_state import TrainState

    cfg, params = _tiny_params()
    state = TrainState(step=jnp.int32(5), params=params, opt_state={})
    ckpt = RunCheckpointer(str(tmp_path), keep=2)
    ckpt.save(5, state, {'step': 5, 'batches_consumed': 5})
    ckpt.close()
    loaded = checkpoints.load_checkpoint(tmp_path, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_a_partial_save_is_skipped_or_named(tmp_path):
    from doa_jax.checkpoints import RunCheckpointer
    from doa_jax.train_state import TrainState

    cfg, params = _tiny_params()
    ckpt = RunCheckpointer(str(tmp_path / 'run'), keep=3)
    ckpt.save(5, TrainState(step=jnp.int32(5), params=params, opt_state={}),
              {'step': 5, 'batches_consumed': 5})
    ckpt.close()
    # A later save killed midway: a step dir without metadata, and an Orbax temp dir.
    steps = next(p for p in (tmp_path / 'run').rglob('5') if p.is_dir()).parent
    (steps / '9' / 'state').mkdir(parents=True)
    (steps / '12.orbax-checkpoint-tmp-1234').mkdir()
    loaded = checkpoints.load_checkpoint(tmp_path / 'run', cfg)      # falls back to step 5
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    import shutil
    shutil.rmtree(steps / '5')
    with pytest.raises(FileNotFoundError, match=r'only a partial save .*9.*killed'):
        checkpoints.load_checkpoint(tmp_path / 'run', cfg)


def test_mismatched_checkpoint_lists_paths_and_both_shapes(tmp_path):
    _, params = _tiny_params()
    checkpoints.write_t5x_legacy(params, tmp_path, step=1)
    other = get_config('t5_1_1_tiny', mlp_dim=64, num_decoder_layers=3)
    with pytest.raises(CheckpointMismatchError) as err:
        checkpoints.load_checkpoint(tmp_path, other)
    msg = str(err.value)
    assert 'encoder/layers_0/mlp/wi_0/kernel: (32, 48) vs (32, 64)' in msg
    assert 'decoder/layers_2' in msg and 'missing' in msg
    # Original-T5 names in a v1.1 config: unexpected and missing names are both listed.
    _, original = _tiny_params('t5_tiny')
    checkpoints.write_t5x_legacy(original, tmp_path / 'orig', step=1)
    with pytest.raises(CheckpointMismatchError, match='unexpected.*mlp/wi/kernel'):
        checkpoints.load_checkpoint(tmp_path / 'orig', get_config('t5_1_1_tiny'))


def test_bad_paths_and_other_architectures(tmp_path):
    with pytest.raises(FileNotFoundError, match='INITIAL_CHECKPOINT_PATH'):
        checkpoints.load_checkpoint(tmp_path / 'nope', get_config('t5_1_1_tiny'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='not a checkpoint doa_jax recognises'):
        checkpoints.load_checkpoint(tmp_path / 'empty', get_config('t5_1_1_tiny'))
    bart = tmp_path / 'bart'
    bart.mkdir()
    (bart / 'config.json').write_text(json.dumps(
            {'model_type': 'bart', 'architectures': ['BartForConditionalGeneration']}))
    with pytest.raises(UnsupportedCheckpointError,
                       match="model_type='bart'.*BartForConditionalGeneration"):
        load_hf(bart)
    encoder_only = tmp_path / 'enc'
    encoder_only.mkdir()
    (encoder_only / 'config.json').write_text(json.dumps(
            {'model_type': 't5', 'architectures': ['T5EncoderModel']}))
    with pytest.raises(UnsupportedCheckpointError, match='T5EncoderModel'):
        load_hf(encoder_only)


_SAVE_THEN_HANG = '''
import sys, time
import jax.numpy as jnp, numpy as np
from doa_jax.checkpoints import RunCheckpointer
ck = RunCheckpointer(sys.argv[1])
ck.save(1, {'w': jnp.arange(4.0)}, {'step': 1})
assert ck.durable(wait=True) == [1]
big = np.random.default_rng(0).standard_normal((32, 1024, 1024)).astype(np.float32)   # 128 MiB
ck.save(2, {'w': jnp.asarray(big)}, {'step': 2})
print('SAVING', flush=True)    # save() returned: orbax writes in the background
time.sleep(300)
'''


@pytest.mark.fault_injection
def test_a_process_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys

    import jax

    from doa_jax.checkpoints import RunCheckpointer
    proc = subprocess.Popen([sys.executable, '-c', _SAVE_THEN_HANG, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'SAVING'
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ckpts = tmp_path / 'checkpoints'
    assert not (ckpts / '2').exists(), 'the save finished before the kill; nothing was tested'
    assert any('tmp' in p.name for p in ckpts.iterdir())        # the partial save is left behind
    ck = RunCheckpointer(str(tmp_path))
    assert ck.latest_step() == 1 and ck.manager.all_steps() == [1]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, data = ck.restore(1, {'w': sharding}, {'w': jax.ShapeDtypeStruct((4,), 'float32')})
    ck.close()
    np.testing.assert_array_equal(np.asarray(state['w']), np.arange(4.0))
    assert data == {'step': 1}
    # The resumed run saves step 2 again, in place of the partial one.
    ck = RunCheckpointer(str(tmp_path))
    ck.save(2, {'w': jnp.ones(3)}, {'step': 2})
    assert ck.durable(wait=True) == [2]
    ck.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ['1', '2']
