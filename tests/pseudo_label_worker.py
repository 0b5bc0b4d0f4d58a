"""Subprocess worker for the pseudo-labeling tests: labels a JSONL pool with a slow fake teacher.

usage: pseudo_label_worker.py POOL_JSONL OUTPUT_DIR SHARD_ID NUM_SHARDS LIMIT SLEEP_S
With NUM_SHARDS == 2 and env DOA_COORDINATOR set, it joins jax.distributed first (gloo CPU).
"""

import os
import sys
import time

from doa_jax import pseudo_label as pl
from tasks.jsonl_task import load_split


def main() -> None:
    pool_path, out, shard, shards, limit, sleep_s = sys.argv[1:7]
    shard, shards, limit, sleep_s = int(shard), int(shards), int(limit), float(sleep_s)
    if os.environ.get('DOA_COORDINATOR'):
        import jax
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(os.environ['DOA_COORDINATOR'], num_processes=shards,
                                   process_id=shard)
        shard, shards = jax.process_index(), jax.process_count()
    ids, inputs, _ = load_split(pool_path, allow_empty_target=True)
    pool = list(zip(ids, inputs))[:limit]

    def label(batch):
        time.sleep(sleep_s)
        return [{'prediction': text[::-1][:20], 'score': -float(len(text))} for text in batch]

    pl.pseudo_label_shard(pool, label, out, shard_id=shard, num_shards=shards, chunk_size=4,
                          batch_size=2)
    print('DONE', shard, flush=True)


if __name__ == '__main__':
    main()
