"""JAX's persistent compilation cache for the entry points: runs of a study (or reruns of a run)
that compile the same programs read them from disk instead of compiling again.

The entry points (`python -m doa_jax.train`, `python -m doa_jax.infer`) call `configure` before
anything compiles. The cache lives beside the run by default, `<run dir>/../compilation_cache`, so
sibling runs (a study's teachers and students, a sweep's runs) share it; gin's
COMPILATION_CACHE_DIR names another directory, or '' to turn it off. Without that macro, jax's own
JAX_COMPILATION_CACHE_DIR environment variable, when set, wins over the default.

jax caches only programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by
default) to compile; that flag (or JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) is left to jax.
"""

from __future__ import annotations

import logging
import os

import jax

DIRNAME = 'compilation_cache'


def default_directory(run_dir: str) -> str:
    """`<run_dir>/../compilation_cache` (run_dir may be a local path or a gs:// URL)."""
    run_dir = run_dir.rstrip('/')
    if '://' not in run_dir:
        run_dir = os.path.abspath(run_dir)
    return f'{os.path.dirname(run_dir)}/{DIRNAME}'


def configure(directory: str | None, run_dir: str | None) -> str | None:
    """Points jax's persistent compilation cache at `directory` (None: $JAX_COMPILATION_CACHE_DIR
    when set, else `default_directory(run_dir)`; '': off) and returns the directory in use, or None
    when the cache is off."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    if directory is None:
        directory = (os.environ.get('JAX_COMPILATION_CACHE_DIR')
                     or (default_directory(run_dir) if run_dir else ''))
    directory = directory or None
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update('jax_compilation_cache_dir', directory)
        # A process that already compiled with another (or no) directory reopens the cache.
        cc.reset_cache()
    if directory:
        logging.info('Persistent compilation cache: %s (COMPILATION_CACHE_DIR; \'\' turns it off).',
                     directory)
    return directory
