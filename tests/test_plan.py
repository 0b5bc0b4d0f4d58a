"""`benchmark plan`: per-device bytes of the train and decode steps on fake CPU meshes are
consistent with the sharding (model parallelism, FSDP) and with the KV cache's shape; the recipe
gate lowers every shipped accelerator recipe, scaled down, for GPU and TPU on 8 fake devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from doa_jax.models.config import get_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plan(tmp_path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / 'plan.json'
    env = dict(os.environ)   # the tests' XLA compile flags (tests/conftest.py); plan adds the devices
    r = subprocess.run([sys.executable, '-m', 'doa_jax.benchmark', 'plan', *flags,
                        f'--json={out}'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def _kv_bytes(model: str, batch: int, data: int, model_axis: int, input_len: int,
              target_len: int, itemsize: int = 2) -> int:
    """Self-attention K/V buffers (max decode length) + cross-attention K/V (input length), per
    decoder layer, with batch over data and heads over model."""
    cfg = get_config(model)
    inner = cfg.num_heads * cfg.head_dim // model_axis
    per_layer = (batch // data) * (input_len + target_len) * inner * itemsize
    return 2 * cfg.num_decoder_layers * per_layer


def _check_decode(plan: dict, kv_expected: int) -> None:
    dec = plan['decode']
    model_axis = plan['mesh']['model']
    # The teacher is split over the model axis only (as pseudo-labeling places it), its matmul
    # weights in bf16 (as decoding holds them): half the float32 bytes, less the few float32
    # norm scales and relative-position tables (a few percent of a tiny model's bytes; weights
    # left whole would double the figure).
    half_shard = plan['param_bytes_total'] / model_axis / 2
    assert half_shard <= dec['param_bytes_per_device'] <= 1.05 * half_shard
    # The cache as declared, plus one int32 decode-position counter.
    assert kv_expected <= dec['kv_cache_bytes_per_device'] <= kv_expected + 16
    assert dec['temp_bytes_per_device'] > dec['kv_cache_bytes_per_device'] > 0
    assert dec['total_bytes_per_device'] == (dec['param_bytes_per_device'] +
                                             dec['temp_bytes_per_device'] +
                                             dec['io_bytes_per_device'])
    # No optimizer state and no gradients: decoding needs less than a train step.
    assert dec['total_bytes_per_device'] < plan['total_bytes_per_device']
    assert plan['fits'] == (plan['train_fits'] and dec['fits'])


@pytest.mark.slow
def test_plan_model_parallel_bytes_and_does_not_fit_tiny_memory(tmp_path):
    plan, stdout = _plan(tmp_path, '--model=t5_1_1_tiny', '--mesh=data:2,model:2', '--batch=4',
                         '--decode_batch=8', '--input_len=16', '--target_len=8',
                         '--device_memory_gb=0.0001')
    assert 'approximates GPU/TPU' in stdout
    assert 'decode' in stdout and 'of which KV' in stdout
    per_model_shard = plan['param_bytes_total'] / 2
    # Model-parallel weights are split over model:2; only the norm scales and position tables
    # are replicated (a few percent of t5_1_1_tiny's bytes).
    assert per_model_shard <= plan['param_bytes_per_device'] <= 1.05 * per_model_shard
    assert plan['temp_bytes_per_device'] > 0
    assert plan['total_bytes_per_device'] == (plan['param_bytes_per_device'] +
                                              plan['optimizer_bytes_per_device'] +
                                              plan['temp_bytes_per_device'])
    assert plan['total_bytes_per_device'] > 0.0001e9 and plan['fits'] is False
    assert plan['decode']['batch'] == 8 and plan['decode']['max_decode_length'] == 8
    _check_decode(plan, _kv_bytes('t5_1_1_tiny', 8, 2, 2, 16, 8))


@pytest.mark.slow
def test_plan_fsdp_shards_params_and_optimizer_over_all_devices(tmp_path):
    plan, _ = _plan(tmp_path, '--model=t5_1_1_tiny', '--mesh=data:2,model:2', '--fsdp',
                    '--optimizer=adamw', '--batch=2', '--input_len=16', '--target_len=8')
    assert plan['fsdp'] is True and plan['decode']['batch'] == 2
    # FSDP also splits `embed` over data: every big weight is split 4 ways, not 2.
    per_device = plan['param_bytes_total'] / 4
    assert per_device <= plan['param_bytes_per_device'] <= 1.05 * per_device
    # AdamW's two moments follow their parameter's sharding (+ a replicated step count).
    assert plan['optimizer_bytes_per_device'] == pytest.approx(
            2 * plan['param_bytes_per_device'], rel=1e-3)
    assert plan['fits'] is True
    # FSDP is train-only: the decode step's teacher is split over model:2, not over all 4 (in
    # bf16, so as many bytes as the train step's float32 quarter).
    assert plan['decode']['param_bytes_per_device'] == pytest.approx(
            plan['param_bytes_per_device'], rel=0.05)
    _check_decode(plan, _kv_bytes('t5_1_1_tiny', 2, 2, 2, 16, 8))


SHIPPED = {   # the accelerator recipes (each a list of gin files) and the steps each runs
    'finetune_teacher': ({'train', 'decode'}, '4x A100-80GB'),
    'finetune_teacher,finetune_teacher_40gb': ({'train'}, '4x A100-40GB'),
    'pseudo_label': ({'decode'}, '4x A100-40GB'),
    'distill_kd': ({'train', 'decode'}, '4x A100-40GB'),
}
# The study files with their targets: each stage as the study runs it, with the steps it lowers.
# paper_main.gin includes wlp_gpu.gin with the same stages, and wlp_gpu_40gb.gin changes only its
# teacher: the gate plans each program once (each file's memory checked against its own target).
STUDIES = {'wlp_gpu': '4x A100-80GB', 'paper_main': '4x A100-80GB',
           'wlp_gpu_40gb': '4x A100-40GB'}
STAGES = {'teacher': {'train', 'decode'}, 'pseudo_label': {'decode'},
          'student': {'train', 'decode'}}


def test_every_study_file_with_a_target_is_gated_in_ci():
    """Each study file that states a target, or inherits one from its include (read as the gate
    reads it, text only), is in STUDIES with that target."""
    from doa_jax.benchmark import recipe
    prefixes = recipe.search_prefixes(None)
    targeted = {}
    for path in sorted((ROOT / 'gin_configs' / 'studies').glob('*.gin')):
        target = recipe.find_target([str(path)], prefixes)
        if target is not None:
            targeted[path.stem] = target.label()
    assert targeted == STUDIES


@pytest.mark.slow
def test_gate_lowers_every_shipped_recipe_scaled_down_on_8_devices(tmp_path):
    """CI's gate: each shipped accelerator recipe as its entry point reads it (remat, scan,
    optimizer, microbatches, mesh, online teacher), and each stage of the study files as the
    study runs it (teacher training and evaluation, pseudo-labeling, student training and
    evaluation), every model scaled to t5_1_1_tiny, on 8 fake devices (data:2 beside model:4),
    lowered for cuda and tpu. A recipe that pins the CPU kernels fails it, and the gate's exit
    status says so."""
    broken = tmp_path / 'pinned.gin'
    broken.write_text("include 'gin_configs/runs/pseudo_label.gin'\n"
                      "get_model_config.matmul_impl = 'cpu_kernels'\n")
    recipes = [','.join(f'gin_configs/runs/{f}.gin' for f in r.split(',')) for r in SHIPPED]
    recipes += [f'gin_configs/studies/{f}.gin' for f in STUDIES]
    out = tmp_path / 'gate.json'
    env = dict(os.environ)   # the tests' XLA compile flags (tests/conftest.py); plan adds the devices
    r = subprocess.run([sys.executable, '-m', 'doa_jax.benchmark', 'plan',
                        *[f'--recipe={x}' for x in recipes + [str(broken)]],
                        '--scale=t5_1_1_tiny', '--devices=8', '--skip_memory', f'--json={out}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 1, r.stderr[-3000:]
    *shipped, pinned = json.loads(out.read_text())
    shipped, studies = shipped[:len(SHIPPED)], shipped[len(SHIPPED):]
    for (name, (steps, target)), result in zip(SHIPPED.items(), shipped):
        assert result['ok'], (name, result.get('error'), result.get('lowered'))
        assert result['model'] == 't5_1_1_tiny' and result['target'] == target
        assert result['devices'] == 8 and result['mesh']['data'] * result['mesh']['model'] == 8
        assert {p: set(parts) for p, parts in result['lowered'].items()} == {
                'cuda': steps, 'tpu': steps}
    assert shipped[-1]['teacher'] == 't5_1_1_tiny'      # the online teacher, scaled too
    assert [(r['recipe'], r['stage']) for r in studies] == [
            ([f'gin_configs/studies/{f}.gin'], stage) for f in STUDIES for stage in STAGES]
    for result in studies:
        assert result['ok'], (result['recipe'], result['stage'], result.get('error'))
        assert result['model'] == 't5_1_1_tiny'
        assert result['target'] == STUDIES[pathlib.Path(result['recipe'][0]).stem]
        assert result['devices'] == 8
        assert {p: set(parts) for p, parts in result['lowered'].items()} == {
                'cuda': STAGES[result['stage']], 'tpu': STAGES[result['stage']]}
    teacher, labeling, student = studies[:3]
    # The teacher as the study file sets it: split 4 ways over model, rematerialized, scanned;
    # it pseudo-labels on that split and is evaluated at the study's eval batch. Every stage
    # trains packed rows at the study's DEFAULT_FEATURE_LENGTHS (VOCABULARY unset).
    assert teacher['mesh'] == labeling['mesh'] == {'data': 2, 'model': 4}
    assert (teacher['remat'], teacher['scan_layers'], teacher['fsdp']) == ('full', True, False)
    assert (teacher['optimizer'], teacher['batch'], teacher['eval_batch']) == ('adamw', 32, 64)
    assert teacher['pack'] and student['pack']
    assert teacher['lengths'] == {'inputs': 256, 'targets': 256}
    assert teacher['lengths_source'].startswith('DEFAULT_FEATURE_LENGTHS')
    assert labeling['batch'] == 64 and labeling['lengths'] == {'inputs': 256, 'targets': 255}
    assert student['mesh'] == {'data': 8, 'model': 1}
    wlp_gpu = ['gin_configs/studies/wlp_gpu.gin']
    assert all(r['same_as'] == wlp_gpu for r in studies[3:6])
    # The 40 GB file: its own teacher (Adafactor, still 4 ways over model), wlp_gpu's others.
    teacher_40gb = studies[6]
    assert 'same_as' not in teacher_40gb and teacher_40gb['optimizer'] == 'adafactor'
    assert teacher_40gb['mesh'] == {'data': 2, 'model': 4}
    assert all(r['same_as'] == wlp_gpu for r in studies[7:])
    assert not pinned['ok'] and not pinned['lowered']['cuda']['decode']['ok']
    assert 'cpu_kernels' in pinned['lowered']['cuda']['decode']['error']
    assert 'gate: FAIL' in r.stdout and \
        r.stdout.count('gate: PASS') == len(SHIPPED) + len(STUDIES) * len(STAGES)
