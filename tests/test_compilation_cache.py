"""The entry points' persistent compilation cache: on by default beside the run, shared by
sibling runs, settable and switchable off from gin."""

from __future__ import annotations

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from doa_jax import compilation_cache, train

TINY = ['--gin_file=gin_configs/runs/finetune.gin', '--gin_file=gin_configs/runs/finetune_tiny.gin',
        '--gin.TRAIN_STEPS=1', '--gin.EVAL_PERIOD=0', '--gin.LOG_PERIOD=1',
        '--gin.CHECKPOINT_PERIOD=1', '--gin.BATCH_SIZE=2']
HITS = '/jax/compilation_cache/cache_hits'


@pytest.fixture
def fresh_cache(monkeypatch):
    """No cache directory from the environment; cache every program however fast it compiled;
    afterwards the cache settings as before."""
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    before = jax.config.jax_compilation_cache_dir
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    events: list[str] = []
    listener = lambda event, **kw: events.append(event)
    jax.monitoring.register_event_listener(listener)
    yield events
    jax.monitoring.unregister_event_listener(listener)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_secs)
    jax.config.update('jax_compilation_cache_dir', before)
    cc.reset_cache()


def test_default_directory_is_beside_the_run():
    assert compilation_cache.default_directory('/x/study/teacher/') == '/x/study/compilation_cache'
    assert compilation_cache.default_directory('gs://b/runs/r1') == 'gs://b/runs/compilation_cache'


def test_a_second_identical_run_reads_the_first_runs_programs(tmp_path, fresh_cache):
    events = fresh_cache
    cache = tmp_path / 'compilation_cache'
    assert train.main(TINY + [f"--gin.MODEL_DIR='{tmp_path / 'run1'}'"]) == 0
    assert jax.config.jax_compilation_cache_dir == str(cache)
    written = set(p.name for p in cache.iterdir())
    assert written, 'the first run wrote no compiled program'
    events.clear()
    assert train.main(TINY + [f"--gin.MODEL_DIR='{tmp_path / 'run2'}'"]) == 0
    assert events.count(HITS) > 0
    assert set(p.name for p in cache.iterdir()) == written   # nothing new to compile


def test_gin_names_another_directory_or_turns_it_off(tmp_path, fresh_cache):
    """COMPILATION_CACHE_DIR is applied before anything runs (here a run that then stops at its
    unknown task)."""
    unknown = ["--gin.MIXTURE_OR_TASK_NAME='no_such_task'"]
    other = tmp_path / 'elsewhere'
    with pytest.raises(ValueError, match='no_such_task'):
        train.main(TINY + unknown + [f"--gin.MODEL_DIR='{tmp_path / 'a'}'",
                                     f"--gin.COMPILATION_CACHE_DIR='{other}'"])
    assert jax.config.jax_compilation_cache_dir == str(other)
    with pytest.raises(ValueError, match='no_such_task'):
        train.main(TINY + unknown + [f"--gin.MODEL_DIR='{tmp_path / 'b'}'",
                                     "--gin.COMPILATION_CACHE_DIR=''"])
    assert jax.config.jax_compilation_cache_dir is None


def test_the_environments_directory_wins_over_the_default(tmp_path, monkeypatch, fresh_cache):
    mine = tmp_path / 'mine'
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(mine))
    assert compilation_cache.configure(None, str(tmp_path / 'run')) == str(mine)
    assert compilation_cache.configure(str(tmp_path / 'gin'), str(tmp_path / 'run')) == str(
            tmp_path / 'gin')
    assert compilation_cache.configure('', str(tmp_path / 'run')) is None
