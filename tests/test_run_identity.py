"""A MODEL_DIR records the run it holds: resuming it with other settings fails listing them (or is
allowed on request), and a checkpoint of another model or optimizer fails in a few lines."""

from __future__ import annotations

import json
import pathlib

import gin
import pytest

from doa_jax import gin_utils, run_identity, train

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--gin_file=gin_configs/runs/finetune.gin', '--gin_file=gin_configs/runs/finetune_tiny.gin']


pytestmark = pytest.mark.usefixtures('gin_at_repo_root')


def _fingerprint(**kw):
    args = dict(mixture_or_task_name='doa_toy', model_config={'emb_dim': 32, 'dtype': 'float32'},
                task_feature_lengths={'inputs': 48, 'targets': 8}, batch_size=8, random_seed=0,
                shuffle=True, loss_normalizing_factor=None,
                extra={'optimizer': {'configurable': 'make_optimizer', 'learning_rate': 3e-3}})
    args.update(kw)
    return run_identity.training_fingerprint(**args)


@pytest.mark.fault_injection
def test_resume_with_another_task_lr_or_seed_is_refused_unless_allowed(tmp_path):
    run_identity.record_training_fingerprint(str(tmp_path), _fingerprint(), None, [])
    other = _fingerprint(mixture_or_task_name='doa_fever', random_seed=1,
                         extra={'optimizer': {'configurable': 'make_optimizer',
                                              'learning_rate': 1e-3}})
    with pytest.raises(run_identity.RunConfigError) as e:
        run_identity.check_training_fingerprint(str(tmp_path), other, 60, allow_change=False)
    message = str(e.value)
    for line in ('task: "doa_toy" -> "doa_fever"', 'optimizer.learning_rate: 0.003 -> 0.001',
                 'random_seed: 0 -> 1', '--gin.ALLOW_CONFIG_CHANGE=True', 'new MODEL_DIR'):
        assert line in message
    # How the model is computed is not what it is: another activation dtype resumes.
    assert run_identity.check_training_fingerprint(
            str(tmp_path), _fingerprint(model_config={'emb_dim': 32, 'dtype': 'bfloat16'}), 60,
            allow_change=False) == []
    diffs = run_identity.check_training_fingerprint(str(tmp_path), other, 60, allow_change=True)
    assert len(diffs) == 3
    run_identity.record_training_fingerprint(str(tmp_path), other, 60, diffs)
    record = json.loads((tmp_path / 'run.json').read_text())
    assert record['fingerprint']['task'] == 'doa_fever'
    assert record['changes'] == [{'step': 60, 'differences': diffs}]


def test_train_steps_budget_and_eval_period_are_not_in_the_description():
    """make_optimizer.total_steps is bound to TRAIN_STEPS: a longer run is a legitimate resume."""
    def describe(*bindings):
        gin.clear_config()
        gin_utils.parse_gin(['gin_configs/runs/finetune.gin', 'gin_configs/runs/finetune_tiny.gin'],
                            ["MODEL_DIR='/tmp/unused'", *bindings])
        return gin_utils.training_description()

    base = describe()
    assert base['optimizer'] == {'configurable': 'make_optimizer', 'learning_rate': 3e-3,
                                 'name': 'adamw', 'schedule': 'constant', 'warmup_steps': 0}
    assert base['model_config']['name'] == 't5_1_1_tiny'
    assert describe('TRAIN_STEPS=500', 'BUDGET_USD=1.0', 'EVAL_PERIOD=7') == base
    assert describe("OPTIMIZER='adafactor'")['optimizer']['name'] == 'adafactor'


@pytest.mark.fault_injection
@pytest.mark.slow
def test_train_entry_refuses_another_config_names_a_foreign_checkpoint_and_allows_on_request(
        tmp_path):
    run = tmp_path / 'run'
    flags = TINY + [f"--gin.MODEL_DIR='{run}'", '--gin.TRAIN_STEPS=2', '--gin.LOG_PERIOD=1',
                    '--gin.CHECKPOINT_PERIOD=2', '--gin.EVAL_PERIOD=0']

    def main(*extra):
        gin.clear_config()
        return train.main(flags + list(extra))

    assert main() == 0
    assert json.loads((run / 'run.json').read_text())['run_id'] == 'run'
    with pytest.raises(run_identity.RunConfigError) as e:
        main('--gin.TRAIN_STEPS=4', '--gin.LEARNING_RATE=0.001', '--gin.RANDOM_SEED=1')
    assert 'optimizer.learning_rate: 0.003 -> 0.001' in str(e.value)
    assert 'random_seed: 0 -> 1' in str(e.value) and 'TRAIN_STEPS' not in str(e.value).split(
            '\n')[1]
    # Another optimizer, even when allowed: its state does not fit the checkpoint.
    with pytest.raises(run_identity.RunConfigError) as e:
        main('--gin.TRAIN_STEPS=4', "--gin.OPTIMIZER='adafactor'",
             '--gin.ALLOW_CONFIG_CHANGE=True')
    message = str(e.value)
    assert 'optimizer state' in message and 'partial_restore' not in message
    assert len(message.splitlines()) < 8
    assert main('--gin.TRAIN_STEPS=4', '--gin.LEARNING_RATE=0.001',
                '--gin.ALLOW_CONFIG_CHANGE=True') == 0
    record = json.loads((run / 'run.json').read_text())
    assert record['fingerprint']['optimizer']['learning_rate'] == 0.001
    assert [c['step'] for c in record['changes']] == [2]
    assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir()) == [2, 4]
