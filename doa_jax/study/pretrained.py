"""Pretrained starting points for a study's models, built once by the documented command, cached.

In the paper the teacher (T5-XXL) and the student (T5-Small) start from public pretrained
checkpoints; pretraining is a sunk cost that no strategy pays. The offline quickstart has no such
checkpoints, so it makes its own: a stage with `StageConfig.pretraining = Pretraining(steps=...)`
starts from its model pretrained by an ordinary training run,

    python -m doa_jax.train --gin_file=gin_configs/runs/pretrain_synthetic.gin \\
      --gin_file=gin_configs/models/<model>.gin --gin.MODEL_DIR=... \\
      --gin.TRAIN_STEPS=<steps> --gin.RANDOM_SEED=<seed>

run in a subprocess the first time and kept in a cache directory keyed by the model, the steps,
the seed, the corpus/objective version and the run file's text. The run is built in a temporary
directory and renamed into place, so two processes that race build twice but never see half a
checkpoint. Its cost ledger stays in the cache, outside STUDY_DIR: no study ledger, point or
total ever includes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

log = logging.getLogger(__name__)

CACHE_ENV = 'DOA_JAX_CACHE'


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """How a study stage's model is pretrained before the study: `steps` of the run file
    `gin_file` (0: none) with `seed`, cached under `cache_dir` (None: $DOA_JAX_CACHE, else
    $XDG_CACHE_HOME/doa_jax, else ~/.cache/doa_jax; then pretrained/)."""

    steps: int = 0
    seed: int = 0
    gin_file: str = 'gin_configs/runs/pretrain_synthetic.gin'
    cache_dir: str | None = None


def cache_root(cache_dir: str | None = None) -> str:
    base = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(
            os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'doa_jax')
    return os.path.join(os.path.abspath(os.path.expanduser(base)), 'pretrained')


def _gin_path(gin_file: str) -> str:
    from doa_jax.gin_utils.parsing import REPO_ROOT
    for path in (gin_file, os.path.join(REPO_ROOT, gin_file)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise FileNotFoundError(f'Pretraining.gin_file {gin_file!r} does not exist (looked in the '
                            f'current directory and in {REPO_ROOT}).')


def corpus_version() -> str:
    """The version of the corpus and objective the default run file pretrains on."""
    from tasks.synthetic_corpus import VERSION
    return VERSION


def cache_key(model: str, p: Pretraining) -> str:
    """<model>_steps<S>_seed<R>_<corpus/objective version>_<run file's sha256, 10 digits>."""
    with open(_gin_path(p.gin_file), 'rb') as f:
        run_file = hashlib.sha256(f.read()).hexdigest()[:10]
    return f'{model}_steps{p.steps}_seed{p.seed}_{corpus_version()}_{run_file}'


def command(model: str, p: Pretraining, model_dir: str) -> list[str]:
    """The pretraining run: `python -m doa_jax.train` with the run file and the model's file."""
    return [sys.executable, '-m', 'doa_jax.train', f'--gin_file={p.gin_file}',
            f'--gin_file=gin_configs/models/{model}.gin', f"--gin.MODEL_DIR='{model_dir}'",
            f'--gin.TRAIN_STEPS={int(p.steps)}', f'--gin.RANDOM_SEED={int(p.seed)}']


def _run(model: str, p: Pretraining, model_dir: str) -> None:
    from doa_jax.gin_utils.parsing import REPO_ROOT
    argv = command(model, p, model_dir)
    log.info('pretraining %s for %d steps (once; cached): %s', model, p.steps,
             ' '.join(argv[1:]))
    done = subprocess.run(argv, cwd=REPO_ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f'pretraining {model} failed (exit {done.returncode}): '
                           f'{" ".join(argv)} (run from {REPO_ROOT}); its output is above.')


def ensure_pretrained(model: str, p: Pretraining,
                      build: Callable[[str, Pretraining, str], None] | None = None) -> str:
    """The directory of `model` pretrained as `p` says (a doa_jax MODEL_DIR, which
    INITIAL_CHECKPOINT_PATH takes): from the cache, or built now by `build(model, p, dir)` (the
    subprocess above) in a temporary directory that is then renamed into place."""
    if p.steps <= 0:
        raise ValueError(f'Pretraining.steps must be positive to build a checkpoint; got {p.steps}.')
    root = cache_root(p.cache_dir)
    key = cache_key(model, p)
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{key}.', dir=root)
    try:
        (build or _run)(model, p, tmp)
        from doa_jax.checkpoints import checkpoint_step
        step = checkpoint_step(tmp)
        if step != p.steps:
            raise RuntimeError(f'pretraining {model} in {tmp} ended with a checkpoint at step '
                               f'{step}, not {p.steps}.')
        with open(os.path.join(tmp, 'pretrained.json'), 'w') as f:
            json.dump({'model': model, **dataclasses.asdict(p), 'key': key,
                       'corpus_version': corpus_version(),
                       'command': command(model, p, '<this directory>')[1:],
                       'note': 'pretraining is a sunk cost: no study charges it'}, f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            log.info('pretraining: another process cached %s first; using it.', final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(stage):
    """`stage` (a StageConfig) with `initial_checkpoint_path` set to its pretrained model when it
    asks for pretraining; unchanged otherwise."""
    p = stage.pretraining
    if p is None or p.steps <= 0:
        return stage
    if stage.initial_checkpoint_path:
        raise ValueError(f'a {stage.model} stage sets both initial_checkpoint_path '
                         f'({stage.initial_checkpoint_path!r}) and pretraining (steps={p.steps}); '
                         'set one: pretraining makes the initial checkpoint.')
    return dataclasses.replace(stage, initial_checkpoint_path=ensure_pretrained(stage.model, p))
