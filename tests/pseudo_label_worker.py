"""Subprocess worker for the pseudo-labeling tests: labels a JSONL pool with a slow fake teacher.

usage: pseudo_label_worker.py POOL_JSONL OUTPUT_DIR SHARD_ID NUM_SHARDS LIMIT SLEEP_S
With NUM_SHARDS == 2 and env DOA_COORDINATOR set, it joins jax.distributed first (gloo CPU).

Test hooks (environment):
  DOA_PL_LEDGER=DIR            prices the chunks into DIR's cost ledger (`pl.ChunkBilling`), the
                               fake teacher's first batch compiling for COMPILE_S seconds first
  DOA_PL_KILL_WRITING_CHUNK=K  SIGKILLs the process while chunk K is being written: its records
                               are on disk and it is priced, its .COMPLETED marker is not (chunks
                               0..K-1 are committed, chunk K+1's first batch is dispatched)
"""

import os
import signal
import sys
import time

from doa_jax import pseudo_label as pl
from tasks.jsonl_task import load_split

CHUNK_SIZE, BATCH_SIZE = 4, 2
COMPILE_S = 0.5   # the fake teacher's compile, counted by its compile clock


def kill_while_writing(out: str, shard: int, chunk: int) -> None:
    """Makes the marker write of chunk `chunk` SIGKILL this process (a fixed moment)."""
    target = pl.chunk_path(out, shard, chunk) + pl.MARKER
    write = pl._atomic_write

    def hooked(path: str, text: str) -> None:
        if path == target:
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, text)

    pl._atomic_write = hooked


def label_pool(pool_path: str, out: str, shard: int, shards: int, limit: int, sleep_s: float,
               ledger_dir: str | None = None) -> pl.ShardResult:
    """Labels the pool's first `limit` examples; with `ledger_dir`, billed as `infer` bills."""
    ids, inputs, _ = load_split(pool_path, allow_empty_target=True)
    pool = list(zip(ids, inputs))[:limit]
    compiled = {'seconds': 0.0}

    def label(batch):
        if ledger_dir and not compiled['seconds']:   # this process's first batch compiles
            time.sleep(COMPILE_S)
            compiled['seconds'] = COMPILE_S
        time.sleep(sleep_s)
        return [{'prediction': text[::-1][:20], 'score': -float(len(text))} for text in batch]

    kwargs = dict(shard_id=shard, num_shards=shards, chunk_size=CHUNK_SIZE,
                  batch_size=BATCH_SIZE)
    if not ledger_dir:
        return pl.pseudo_label_shard(pool, label, out, **kwargs)
    from doa_jax import cost
    with pl.ChunkBilling(cost.Ledger(ledger_dir), cost.load_prices(None), 'pl',
                         compile_clock=lambda: compiled['seconds']) as billing:
        return pl.pseudo_label_shard(pool, label, out, meter_factory=billing.meter, **kwargs)


def main() -> None:
    pool_path, out, shard, shards, limit, sleep_s = sys.argv[1:7]
    shard, shards, limit, sleep_s = int(shard), int(shards), int(limit), float(sleep_s)
    if os.environ.get('DOA_COORDINATOR'):
        import jax
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(os.environ['DOA_COORDINATOR'], num_processes=shards,
                                   process_id=shard)
        shard, shards = jax.process_index(), jax.process_count()
    if os.environ.get('DOA_PL_KILL_WRITING_CHUNK'):
        kill_while_writing(out, shard, int(os.environ['DOA_PL_KILL_WRITING_CHUNK']))
    label_pool(pool_path, out, shard, shards, limit, sleep_s, os.environ.get('DOA_PL_LEDGER'))
    print('DONE', shard, flush=True)


if __name__ == '__main__':
    main()
