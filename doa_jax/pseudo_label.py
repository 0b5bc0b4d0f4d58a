"""Sharded, resumable pseudo-labeling: a teacher decodes an unlabeled pool into JSONL chunks.

Layout of an output directory (read back by `tasks.jsonl_task.register_pseudo_labeled_task`):
  chunk-SSSSS-CCCCC.jsonl            one line per example: id, input, index, prediction, score[,
                                     topk_ids, topk_logprobs, target_ids (decoded ids, EOS included)]
  chunk-SSSSS-CCCCC.jsonl.COMPLETED  written (atomically) only after the chunk file is fsynced; it
                                     records the chunk's pool indices and id range
  .manifest.json                     the teacher's fingerprint, task, split, decode settings, the
                                     chunk layouts and the ledger run id (`pseudo_label_manifest`)
Each host (shard S of N) takes pool indices S, S+N, S+2N, ... (index striding), so it reads only
its own examples; its list is cut into chunks of `chunk_size`. A restarted job skips every chunk that
has a marker, so a SIGKILL loses at most the chunks in flight (the one decoding and, while its
next batch is dispatched, the finished one before it); with another chunk size, LIMIT or
host count it keeps every labeled example and labels only the missing ones (chunks of a new
layout are named `chunk-SSSSS-CCCCC-gG.jsonl`). Another teacher, task or decode settings is
refused unless `overwrite`. Temporary files start with '.', which the task reader's glob never
sees. `merge` checks that every pool id appears exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from doa_jax import pseudo_label_manifest as manifest_lib
from doa_jax import run_identity
from doa_jax.pseudo_label_manifest import PseudoLabelError

Example = tuple[str, str]  # (id, input text)
# label_batch(inputs) -> list of dicts with at least 'prediction' and 'score'.
LabelBatchFn = Callable[[Sequence[str]], list[dict[str, Any]]]
MARKER = manifest_lib.MARKER


def shard_indices(num_examples: int, num_shards: int, shard_id: int) -> list[int]:
    """Pool indices this shard owns (striding: shard_id, shard_id + num_shards, ...)."""
    if not 0 <= shard_id < num_shards:
        raise PseudoLabelError(f'shard_id={shard_id} must be in [0, {num_shards}); check '
                               'jax.process_index() / the launcher flags.')
    return list(range(shard_id, num_examples, num_shards))


def chunk_path(output_dir: str, shard_id: int, chunk_id: int, generation: int = 0) -> str:
    return os.path.join(output_dir, manifest_lib.chunk_name(shard_id, chunk_id, generation))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    """Writes `text` to a dot-prefixed temp file, fsyncs it, renames it over `path`, fsyncs the dir."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f'.{name}.tmp-{os.getpid()}')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def write_chunk(path: str, records: Sequence[dict[str, Any]],
                marker: dict[str, Any] | None = None) -> None:
    """Writes one chunk, then its marker (`marker`, default its count); a reader that trusts
    markers never sees a partial chunk."""
    _atomic_write(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))
    _atomic_write(path + MARKER, json.dumps(marker or {'count': len(records)}) + '\n')


def is_completed(path: str) -> bool:
    return os.path.exists(path + MARKER) and os.path.exists(path)


@dataclasses.dataclass
class ShardResult:
    shard_id: int
    chunks_written: int
    chunks_skipped: int
    examples_written: int
    stopped_by_budget: bool = False
    examples_done: int = 0      # this shard's pool examples labeled now or before


def _chunks(indices: Sequence[int], chunk_size: int) -> Iterator[tuple[int, Sequence[int]]]:
    for c, start in enumerate(range(0, len(indices), chunk_size)):
        yield c, indices[start:start + chunk_size]


def pseudo_label_shard(pool: Sequence[Example], label_batch: LabelBatchFn, output_dir: str, *,
                       shard_id: int = 0, num_shards: int = 1, chunk_size: int = 256,
                       batch_size: int = 32,
                       meter_factory: Callable[[int, int], Any] | None = None,
                       on_chunk: Callable[[int], None] | None = None,
                       keep_going: Callable[[int], bool] | None = None,
                       identity: Mapping[str, Any] | None = None, overwrite: bool = False,
                       plan: manifest_lib.Plan | None = None) -> ShardResult:
    """Labels this shard's part of `pool`, skipping examples that completed chunks hold.

    `identity` (teacher fingerprint, task, decode settings) must match what the directory's
    manifest records, else PseudoLabelError names the difference; `overwrite` deletes the
    directory's labels instead. `plan` (from `pseudo_label_manifest.prepare`) is given when the
    caller prepared the directory itself (one host for all); else this call prepares it.
    `meter_factory(first, last)` returns a context manager (e.g. `cost.ComputeMeter` with
    write=True) that prices each chunk by its range in the shard-major order of the pool (shard
    0's examples, then shard 1's, ...): ranges tile [0, pool size) without overlap across hosts,
    and a restart never double-counts. With one shard they are the pool indices. Under a later
    layout (generation g > 0) it is called with `generation=g` as well: ranges of one generation
    never overlap, those of two may (record them apart, e.g. ComputeMeter(seq=g)).
    `keep_going(chunk_id)` is asked before each chunk that needs work, once the chunk before it is
    priced; False stops the shard there (a budget cap), leaving the completed chunks a prefix of
    the shard.

    Batches run one ahead: batch i+1 is dispatched before batch i is finished and its chunk
    written. Where `label_batch` has `dispatch(inputs)` and `finish(pending)` halves
    (`TeacherLabeler`: tokenize and enqueue the decode; wait, detokenize), the host's tokenizing,
    detokenizing, scoring and chunk writing thus run while the devices decode the next batch (with
    `keep_going`, a chunk's last batch is finished before the next chunk starts). Records, chunks
    and markers are those of labeling one batch at a time. Chunk meters tile the wall clock: one
    starts where the one before it stops.
    """
    if not pool:
        raise PseudoLabelError('The unlabeled pool is empty: nothing to pseudo-label. Check the '
                               'task name (e.g. doa_<task>_unlabeled_<N>) and its split.')
    if chunk_size < 1 or batch_size < 1:
        raise PseudoLabelError(f'chunk_size={chunk_size} and batch_size={batch_size} must be >= 1.')
    indices = shard_indices(len(pool), num_shards, shard_id)
    if plan is None:
        layout = {'num_shards': num_shards, 'chunk_size': chunk_size, 'pool_size': len(pool)}
        plan = manifest_lib.prepare(output_dir, identity, layout, shard_id, overwrite=overwrite)
    offset = sum(len(range(s, len(pool), num_shards)) for s in range(shard_id))
    dispatch, finish = _stages(label_batch)
    skipped, stopped = 0, False

    def jobs() -> Iterator[_Job]:   # the chunks that need work, asked lazily, in order
        nonlocal skipped, stopped
        for chunk_id, idx in _chunks(indices, chunk_size):
            path = chunk_path(output_dir, shard_id, chunk_id, plan.generation)
            todo = [i for i in idx if i not in plan.done]
            if not todo or is_completed(path):
                skipped += 1
                continue
            if keep_going is not None and not keep_going(chunk_id):
                stopped = True
                return
            # Positions in the shard-major order; a chunk partly labeled under another layout
            # prices only its missing examples (their first to last position).
            first, last = (offset + (i - shard_id) // num_shards for i in (todo[0], todo[-1]))
            yield _Job(chunk_id, path, todo, first, last)

    def batches() -> Iterator[tuple[_Job, list[int], bool]]:   # (chunk, indices, its last?)
        for job in jobs():
            for b in range(0, len(job.todo), batch_size):
                yield job, job.todo[b:b + batch_size], b + batch_size >= len(job.todo)

    written = examples = 0
    done = sum(1 for i in indices if i in plan.done)
    unpriced: collections.deque[_Job] = collections.deque()   # dispatched; the first is metered

    def open_meter(job: _Job) -> None:
        if meter_factory is not None:
            job.meter = (meter_factory(job.first, job.last) if plan.generation == 0 else
                         meter_factory(job.first, job.last, generation=plan.generation))
            job.meter.__enter__()

    def retire(entry) -> _Job | None:
        """Waits for a dispatched batch and keeps its records; prices its chunk if it was the
        chunk's last batch and returns the chunk, ready to write."""
        job, part, pending, last = entry
        outs = finish(pending)
        if len(outs) != len(part):
            raise PseudoLabelError(f'label_batch returned {len(outs)} outputs for '
                                   f'{len(part)} inputs.')
        for i, out in zip(part, outs):
            job.records.append({'id': pool[i][0], 'input': pool[i][1], 'index': i, **out})
        if not last:
            return None
        unpriced.popleft()
        if job.meter is not None:
            # Priced before the marker exists: a crash in between redoes the chunk, and the
            # range-keyed ledger entry keeps it counted once.
            job.meter.__exit__(None, None, None)
        if unpriced:   # the next chunk is already decoding: its meter starts where this one ends
            open_meter(unpriced[0])
        return job

    def write(job: _Job) -> None:
        nonlocal written, examples, done
        write_chunk(job.path, job.records, manifest_lib.marker_record(
                job.records, shard_id=shard_id, chunk_id=job.chunk_id,
                generation=plan.generation))
        written += 1
        examples += len(job.records)
        done += len(job.records)
        if on_chunk is not None:
            on_chunk(job.chunk_id)

    # One batch ahead: batch i+1 is dispatched (tokenized, its decode enqueued on the devices)
    # before batch i is waited for, detokenized and its chunk written, so that host work runs
    # while the devices decode. Records, chunks and markers are the same as one batch at a time.
    stream = batches()
    inflight = ready = None
    while True:
        if inflight is not None and inflight[3] and keep_going is not None:
            # The budget check before the next chunk reads this chunk's price: price it first.
            ready, inflight = retire(inflight), None
        try:
            nxt = next(stream, None)
            if nxt is not None:
                job, part, last = nxt
                if not unpriced or unpriced[-1] is not job:   # the chunk's first batch
                    unpriced.append(job)
                    if len(unpriced) == 1:
                        open_meter(job)
                nxt = job, part, dispatch([pool[i][1] for i in part]), last
        except Exception:
            # A failed batch keeps the chunks before it, as labeling one batch at a time did.
            if ready is not None:
                write(ready)
            if inflight is not None and inflight[3]:
                write(retire(inflight))
            raise
        if ready is not None:   # written while the devices decode the batch just dispatched
            write(ready)
            ready = None
        if inflight is not None:
            ready = retire(inflight)
        inflight = nxt
        if inflight is None and ready is None:
            break
    return ShardResult(shard_id, written, skipped, examples, stopped_by_budget=stopped,
                       examples_done=done)


@dataclasses.dataclass
class _Job:
    """A chunk being labeled: its pool indices to label, its range in the shard-major order."""
    chunk_id: int
    path: str
    todo: list[int]
    first: int
    last: int
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    meter: Any = None


def _stages(label_batch: LabelBatchFn) -> tuple[Callable[[Sequence[str]], Any],
                                                Callable[[Any], list[dict[str, Any]]]]:
    """(dispatch, finish) of a `label_batch`: its own two halves where it has them
    (`TeacherLabeler`), else the whole call then the identity."""
    dispatch = getattr(label_batch, 'dispatch', None)
    finish = getattr(label_batch, 'finish', None)
    if callable(dispatch) and callable(finish):
        return dispatch, finish
    return label_batch, lambda outs: outs


def read_chunks(output_dir: str) -> list[dict[str, Any]]:
    """Every record of every completed chunk; chunks without a marker are ignored (in flight)."""
    names = sorted(n for n in os.listdir(output_dir)
                   if n.startswith('chunk-') and n.endswith('.jsonl'))
    records = []
    for name in names:
        path = os.path.join(output_dir, name)
        if not os.path.exists(path + MARKER):
            continue
        with open(path, encoding='utf-8') as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def merge(output_dir: str, expected_ids: Sequence[str],
          beyond_limit_ok: bool = False) -> dict[str, Any]:
    """Checks exactly-once coverage of `expected_ids` by count and ids; writes .merge.json.

    `beyond_limit_ok`: `expected_ids` are a prefix of the pool (a LIMIT or a budget stop), and
    records of pool indices past it (kept from an earlier, larger run) are not unexpected.
    Raises PseudoLabelError naming the missing, duplicate or unexpected ids.
    """
    records = read_chunks(output_dir)
    if beyond_limit_ok:
        records = [r for r in records if int(r.get('index', -1)) < len(expected_ids)]
    seen: dict[str, int] = {}
    for r in records:
        seen[str(r['id'])] = seen.get(str(r['id']), 0) + 1
    expected = [str(i) for i in expected_ids]
    dup = sorted(k for k, v in seen.items() if v > 1)
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    if dup or missing or extra or len(records) != len(expected):
        raise PseudoLabelError(
                f'{output_dir}: {len(records)} pseudo-labels for {len(expected)} pool examples; '
                f'duplicates {dup[:5]}, missing {missing[:5]}, unexpected {extra[:5]}. Re-run '
                'inference to label the missing ones (completed chunks are kept); duplicates or '
                'unexpected ids come from chunks of another pool: relabel with --overwrite.')
    chunks = sum(1 for n in os.listdir(output_dir) if n.startswith('chunk-') and n.endswith(MARKER))
    summary = {'count': len(records), 'chunks': chunks}
    _atomic_write(os.path.join(output_dir, '.merge.json'), json.dumps(summary) + '\n')
    return summary


# --- the model side -------------------------------------------------------------------------


def teacher_mesh(mesh_config: Any = None) -> Any:
    """The mesh one host decodes on: its own (local) devices, split (data, model).

    Hosts label disjoint strides of the pool independently, so the teacher is sharded over each
    host's local devices (an XXL teacher over model=4 GPUs of one node), never across hosts.
    """
    import jax

    from doa_jax import partitioning

    return partitioning.make_mesh(mesh_config or partitioning.MeshConfig(),
                                  devices=jax.local_devices())


class TeacherLabeler:
    """A `label_batch` over a teacher placed on a (data, model) mesh of this host's devices.

    Parameters are laid out by the model's logical axis names (`partitioning.STANDARD_RULES`), so
    each device holds only its slice of every sharded weight. Batches are padded to `batch_size`
    rows (split over the data axis) and inputs to length buckets, so a stream of batches compiles
    the decoder once per bucket; the optional teacher-forced top-k pass is jitted the same way.
    `labeler(inputs)` labels one batch; `dispatch(inputs)` and `finish(pending)` are its two
    halves, which `pseudo_label_shard` uses to keep the next batch decoding while it detokenizes
    and writes this one.
    """

    def __init__(self, params: Any, config: Any, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], *, max_input_length: int,
                 max_decode_length: int, batch_size: int = 32, method: str = 'greedy',
                 num_beams: int = 4, top_k: int = 0, eos_id: int = 1, mesh: Any = None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        from doa_jax import decoding, partitioning
        from doa_jax.models.t5 import T5
        from doa_jax.train_state import abstract_params

        self.mesh = mesh if mesh is not None else teacher_mesh()
        data = self.mesh.shape[partitioning.DATA_AXIS]
        if batch_size % data:
            raise ValueError(f'batch_size={batch_size} (gin: BATCH_SIZE) is not divisible by the '
                             f'mesh data axis {data}; use a multiple of {data} or a larger '
                             'MESH_MODEL.')
        if top_k > config.vocab_size:
            raise ValueError(f'top_k={top_k} exceeds the teacher vocab_size {config.vocab_size}.')
        # Prepared once (unscanned, weights in the compute dtype), then placed: the decoder and the
        # top-k pass share this one sharded copy.
        params, config = decoding.prepare_params(params, config)
        self.config, self.encode, self.decode_text = config, encode, decode
        self.max_input_length, self.top_k, self.eos_id = max_input_length, top_k, eos_id
        self.rules = partitioning.STANDARD_RULES
        model = T5(config)
        dummy = jnp.ones((1, 1), jnp.int32)
        _, shardings = abstract_params(lambda r: model.init(r, dummy, dummy)['params'],
                                       self.mesh, self.rules, jax.random.PRNGKey(0))
        self.param_shardings = shardings
        self.params = jax.device_put(params, shardings)
        rows = NamedSharding(self.mesh, PartitionSpec(partitioning.DATA_AXIS))
        matrix = partitioning.batch_sharding(self.mesh)
        buckets = [b for b in decoding.DEFAULT_BUCKETS if b < max_input_length]
        # The decoder prepares this one placed copy once (where the matmul backend lays weights
        # out, their layouts are made here and placed where their weights are).
        self.decoder = decoding.Decoder(
                config, self.params, max_decode_length=max_decode_length, batch_size=batch_size,
                length_buckets=buckets + [max_input_length], method=method, eos_id=eos_id,
                num_beams=num_beams,
                jit_kwargs=lambda weights: {
                        'in_shardings': (jax.tree.map(lambda x: x.sharding, weights), matrix,
                                         None),
                        'out_shardings': (matrix, rows)})

        def topk(p, enc, targets):
            # Rows past the batch's inputs (all-zero encoder rows) are forced on zeros, whatever
            # the decoder wrote there: each row's top-k is what it was when this pass ran on host
            # copies of the decoded rows.
            targets = jnp.where((enc != 0).any(axis=1, keepdims=True), targets, 0)
            dec_in = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
            logits = model.apply({'params': p}, enc, dec_in, targets)
            vals, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), top_k)
            return vals, ids

        cube = NamedSharding(self.mesh, PartitionSpec(partitioning.DATA_AXIS, None, None))
        self._topk = jax.jit(topk, in_shardings=(shardings, matrix, matrix),
                             out_shardings=(cube, cube))

    def _run(self, fn, *args):
        import jax
        from flax import linen as nn

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return fn(*args)

    def dispatch(self, inputs: Sequence[str]) -> _Pending:
        """Tokenizes `inputs` and enqueues their decode (and top-k pass) on the devices; returns
        at once, before the devices finish (JAX dispatch is asynchronous). `finish` reads it."""
        rows = [list(self.encode(t))[:self.max_input_length - 1] + [self.eos_id] for t in inputs]
        if not rows:
            return _Pending(0, np.zeros((0, 0), np.int32), np.zeros((0,), np.float32), None)
        enc = self.decoder.pad(rows)
        tokens, scores = self._run(self.decoder.decode_batch, enc)
        topk = None
        if self.top_k > 0:   # reads the decoded rows where they are, on the devices
            topk = self._run(self._topk, self.params, enc, tokens)
        return _Pending(len(rows), tokens, scores, topk)

    def finish(self, pending: _Pending) -> list[dict[str, Any]]:
        """Waits for a dispatched batch and detokenizes it: one record per input."""
        from doa_jax.decoding import decoded_lengths

        n = pending.n
        out, scores = np.asarray(pending.tokens)[:n], np.asarray(pending.scores)[:n]
        lengths = decoded_lengths(out, self.eos_id)
        topk = None
        if pending.topk is not None:
            topk = np.asarray(pending.topk[0])[:n], np.asarray(pending.topk[1])[:n]
        results = []
        for r in range(n):
            n_r = int(lengths[r])
            body = [int(t) for t in out[r, :n_r] if t != self.eos_id]
            rec = {'prediction': self.decode_text(body), 'score': float(scores[r])}
            if topk is not None:
                rec['topk_logprobs'] = np.round(topk[0][r, :n_r], 6).tolist()
                rec['topk_ids'] = topk[1][r, :n_r].tolist()
                # The decoded ids (EOS included): the student's reader checks that the
                # re-tokenized prediction gives exactly these before it trusts the top-k rows.
                rec['target_ids'] = [int(t) for t in out[r, :n_r]]
            results.append(rec)
        return results

    def __call__(self, inputs: Sequence[str]) -> list[dict[str, Any]]:
        return self.finish(self.dispatch(inputs))


@dataclasses.dataclass
class _Pending:
    """A batch in flight: its size and the device arrays its decode will fill."""
    n: int
    tokens: Any
    scores: Any
    topk: tuple[Any, Any] | None


def model_label_batch(params: Any, config: Any, encode: Callable[[str], list[int]],
                      decode: Callable[[list[int]], str], *, max_input_length: int,
                      max_decode_length: int, method: str = 'greedy', num_beams: int = 4,
                      top_k: int = 0, eos_id: int = 1, batch_size: int = 32,
                      mesh: Any = None) -> LabelBatchFn:
    """A `label_batch` that tokenizes, decodes on the mesh (`TeacherLabeler`) and detokenizes."""
    return TeacherLabeler(params, config, encode, decode, max_input_length=max_input_length,
                          max_decode_length=max_decode_length, batch_size=batch_size,
                          method=method, num_beams=num_beams, top_k=top_k, eos_id=eos_id,
                          mesh=mesh)


# --- the job: a seqio pool, a checkpoint, this host's shard -----------------------------------


def read_pool(mixture_or_task_name: str, split: str, shard_id: int = 0, num_shards: int = 1,
              limit: int | None = None) -> tuple[list[Example], int]:
    """(this shard's (id, input) pairs, pool size) of a task split; inputs are raw (untokenized).

    Only the ids of other shards are read (for the size); ids default to '<split>:<index>'.
    """
    import seqio

    task = seqio.get_mixture_or_task(mixture_or_task_name)
    ds = task.source.get_dataset(split=split, shuffle=False)
    mine, total = [], 0
    for i, ex in enumerate(ds.as_numpy_iterator()):
        if limit is not None and i >= limit:
            break
        total += 1
        if i % num_shards == shard_id:
            key = ex['id'].decode() if 'id' in ex else f'{split}:{i}'
            mine.append((key, ex['inputs'].decode('utf-8')))
    return mine, total


def pool_ids(mixture_or_task_name: str, split: str, limit: int | None = None) -> list[str]:
    pool, _ = read_pool(mixture_or_task_name, split, 0, 1, limit)
    return [k for k, _ in pool]


def load_teacher(checkpoint_path: str, config: Any) -> Any:
    """Teacher parameters; a missing or partial checkpoint is named with the path."""
    if not checkpoint_path or not os.path.exists(checkpoint_path):
        raise FileNotFoundError(f'Teacher checkpoint {checkpoint_path!r} does not exist; set '
                                '--gin.CHECKPOINT_PATH to a doa_jax run dir, an HF or t5x checkpoint.')
    from doa_jax.checkpoints import load_checkpoint
    try:
        return load_checkpoint(checkpoint_path, config)
    except FileNotFoundError:
        raise
    except Exception as e:  # a partial or foreign checkpoint
        raise FileNotFoundError(f'Teacher checkpoint {checkpoint_path!r} could not be read '
                                f'({type(e).__name__}: {e}); it may be partial (a run killed '
                                'mid-save) — point CHECKPOINT_PATH at a completed step.') from e


def run_pseudo_labeling(*, checkpoint_path: str, output_dir: str, model_config: Any,
                        mixture_or_task_name: str, split: str = 'train',
                        max_input_length: int = 512, max_decode_length: int = 128,
                        batch_size: int = 32, chunk_size: int = 256, method: str = 'greedy',
                        num_beams: int = 4, top_k: int = 0, student_vocab_size: int | None = None,
                        limit: int | None = None, shard_id: int | None = None,
                        num_shards: int | None = None,
                        cost_ledger_dir: str | None = None, prices: Any = None,
                        max_usd: float | None = None, mesh_config: Any = None,
                        overwrite: bool = False) -> ShardResult:
    """Pseudo-labels this host's shard of a task split, then (on process 0, after all hosts
    finish) checks exactly-once coverage with `merge`. Bad vocabularies fail before any compute.

    `output_dir` records what it holds (`pseudo_label_manifest`): the teacher's fingerprint
    (`teacher_fingerprint`), task, split and decode settings. A rerun with other ones fails naming
    them, before any decoding, unless `overwrite` (gin: OVERWRITE, flag --overwrite), which deletes
    the old labels. Another `chunk_size`, `limit` or host count resumes: finished examples are
    kept and only the missing ones are labeled.

    Each chunk's device time is priced into the cost ledger in `cost_ledger_dir` (default: the
    directory holding `output_dir`), under the run id the directory records (first: its name),
    stage 'pseudo_label',
    at `prices` (a PriceTable or YAML path; default: the package's table). `max_usd` caps the
    run's spending: before each chunk, the chunks already priced plus the last chunk's cost must
    fit, else the run stops and the completed chunks (a prefix of the pool) are what it bought.
    Chunks are priced without the compiles inside them, which are billed as the attempt's
    (`ChunkBilling`); the cap counts the work (`work_usd`), not what a killed attempt added.
    The cap needs one shard (one host), so that the prefix is well defined.

    `mesh_config` (a `partitioning.MeshConfig`; gin: MESH_DATA, MESH_MODEL) splits this host's
    devices into (data, model): the teacher's weights are sharded over `model`, each batch over
    `data`. `batch_size` must be a multiple of the data axis.
    """
    import jax
    import seqio

    from doa_jax.distill_losses import check_same_vocab

    if student_vocab_size is not None:
        check_same_vocab(model_config.vocab_size, student_vocab_size)
    if max_usd is not None and (num_shards or jax.process_count()) > 1:
        raise PseudoLabelError(f'max_usd={max_usd} caps spending by stopping at a chunk boundary, '
                               'which needs a single shard; run the budgeted job on one host, or '
                               'drop the cap and bound the pool with limit=.')
    task = seqio.get_mixture_or_task(mixture_or_task_name)
    vocab = task.output_features['inputs'].vocabulary
    if vocab.vocab_size > model_config.vocab_size:
        raise ValueError(f'Task {mixture_or_task_name!r} vocabulary has {vocab.vocab_size} ids but '
                         f'the teacher config only {model_config.vocab_size}; use the teacher\'s '
                         'vocabulary (--gin.VOCABULARY) or a matching model config.')
    shard_id = jax.process_index() if shard_id is None else shard_id
    num_shards = jax.process_count() if num_shards is None else num_shards
    pool, total = read_pool(mixture_or_task_name, split, shard_id, num_shards, limit)
    if total == 0:
        raise PseudoLabelError(f'The unlabeled pool {mixture_or_task_name!r} split {split!r} is '
                               'empty: nothing to pseudo-label.')
    identity = {'task': mixture_or_task_name, 'split': split,
                'decode': {'method': method, 'num_beams': num_beams if method == 'beam' else None,
                           'top_k': top_k, 'max_input_length': max_input_length,
                           'max_decode_length': max_decode_length,
                           'dtype': run_identity.describe(model_config.dtype)}}
    manifest_lib.check(output_dir, identity, overwrite)   # before the teacher is read
    mesh = teacher_mesh(mesh_config)   # a bad mesh fails before the teacher is read
    params = load_teacher(checkpoint_path, model_config)
    identity['teacher'] = teacher_fingerprint(params)
    manifest_lib.check(output_dir, identity, overwrite)
    label = model_label_batch(params, model_config, vocab.encode, vocab.decode,
                              max_input_length=max_input_length,
                              max_decode_length=max_decode_length, method=method,
                              num_beams=num_beams, top_k=top_k, eos_id=vocab.eos_id,
                              batch_size=batch_size, mesh=mesh)
    del params   # the labeler holds the placed (sharded) copy
    from doa_jax import cost

    ledger_dir = cost_ledger_dir or os.path.dirname(os.path.abspath(output_dir))
    ledger = cost.Ledger(ledger_dir)
    layout = {'num_shards': num_shards, 'chunk_size': chunk_size, 'pool_size': total}
    info = {'teacher_checkpoint': os.path.abspath(checkpoint_path), 'limit': limit}
    multihost = num_shards > 1 and jax.process_count() > 1
    # Process 0 records the layout and the run id first; the others then read them.
    if shard_id == 0:
        plan = manifest_lib.prepare(output_dir, identity, layout, shard_id, overwrite=overwrite,
                                    info=info)
        run_id = manifest_lib.run_id(output_dir, ledger, plan.legacy)
    if multihost:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('pseudo_label_manifest')
    if shard_id != 0:
        plan = manifest_lib.prepare(output_dir, identity, layout, shard_id, write=False)
        run_id = run_identity.run_id_or_name(output_dir, manifest_lib.MANIFEST)
    result = ShardResult(shard_id, 0, 0, 0)
    if pool:
        # Global indices of this shard: striding keeps them, so chunk ranges are global too.
        table = prices if isinstance(prices, cost.PriceTable) else cost.load_prices(prices)
        # Each host prices its own chunks on its own devices (the teacher mesh), not the cluster;
        # its compiles apart, as its attempt's (crash overhead when a rerun follows a kill).
        keep_going = None
        if max_usd is not None:
            keep_going = lambda _: _fits_budget(ledger, run_id, chunk_size, max_usd)
        with ChunkBilling(ledger, table, run_id, mesh=mesh, shard_id=shard_id,
                          num_shards=num_shards) as billing:
            result = pseudo_label_shard(_Strided(pool, shard_id, num_shards, total), label,
                                        output_dir, shard_id=shard_id, num_shards=num_shards,
                                        chunk_size=chunk_size, batch_size=batch_size,
                                        meter_factory=billing.meter, keep_going=keep_going,
                                        plan=plan)
            billing.end('stopped' if result.stopped_by_budget else 'done')
    if multihost:
        multihost_utils.sync_global_devices('pseudo_label_done')
    if shard_id == 0:
        ids = pool_ids(mixture_or_task_name, split, limit)
        if result.stopped_by_budget:   # one shard: the labeled examples are a prefix of the pool
            ids = ids[:result.examples_done]
        merge(output_dir, ids, beyond_limit_ok=True)
    return result


class ChunkBilling:
    """Prices one host's pseudo-labeling in the cost ledger as one *attempt* of the run.

    Each chunk's compute is a range-keyed row (stage 'pseudo_label', billed once however often a
    crash makes it run). The compile time inside a chunk (`compile_clock`, by default
    `cost.meter.compile_seconds`) is billed apart, as a 'compile' row of this attempt (stage
    `attempt_stage`), so that a rerun's compile is not the work of its first chunk. A rerun opens
    the next attempt, which closes a killed one as 'crashed': that attempt's compiles are then
    crash overhead (`Ledger.crash_overhead_usd`), and `spent_usd - crash_overhead_usd` is an
    uninterrupted run's bill (its one compile, each chunk once), up to timing noise. The work a
    SIGKILL interrupts (a chunk decoding, unpriced) the ledger never hears of.

    Hosts of a multi-host job each hold an attempt: shard S of N > 1 records its attempts and
    compiles under `pseudo_label.shardS`, so that one host never closes another's attempt.

    with ChunkBilling(ledger, prices, run_id, mesh=mesh) as billing:
        pseudo_label_shard(..., meter_factory=billing.meter)
    """

    STAGE = 'pseudo_label'

    def __init__(self, ledger: Any, prices: Any, run_id: str, *, mesh: Any = None,
                 shard_id: int = 0, num_shards: int = 1,
                 compile_clock: Callable[[], float] | None = None):
        from doa_jax.cost import meter as meter_lib
        self.ledger, self.prices, self.run_id, self.mesh = ledger, prices, run_id, mesh
        self.attempt_stage = self.STAGE if num_shards == 1 else f'{self.STAGE}.shard{shard_id}'
        self.compile_clock = compile_clock or meter_lib.compile_seconds
        self.attempt: int | None = None
        self.examples = 0
        self._compiles = 0

    def __enter__(self) -> 'ChunkBilling':
        self.compile_clock()   # starts listening before anything compiles
        self.attempt = self.ledger.begin_attempt(self.run_id, self.attempt_stage, 0)
        return self

    def end(self, reason: str) -> None:
        """Closes the attempt ('done', 'stopped' at a budget cap, 'error')."""
        if self.attempt is not None:
            self.ledger.end_attempt(self.run_id, self.attempt_stage, self.attempt,
                                    self.examples, reason)
            self.attempt = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end('done' if exc_type is None else 'error')

    def meter(self, first: int, last: int, generation: int = 0) -> Any:
        """The meter of one chunk (`pseudo_label_shard`'s `meter_factory`)."""
        from doa_jax import cost
        self.examples = max(self.examples, last + 1)   # how far this attempt got (end_step)
        return cost.ComputeMeter(self.ledger, self.prices, self.run_id, self.STAGE, first, last,
                                 mesh=self.mesh, write=True, seq=generation,
                                 compile_clock=self.compile_clock, on_compile=self._compiled)

    def _compiled(self, seconds: float, meter: Any) -> None:
        self._compiles += 1
        self.ledger.record_overhead(self.run_id, self.attempt_stage, self.attempt, 'compile',
                                    self._compiles, meter.first, seconds, meter.device.kind,
                                    meter.device.count, meter.rate, billable=True,
                                    note=f'compiled while labeling [{meter.first}, {meter.last}]')


def work_usd(ledger: Any, run_id: str) -> tuple[float, float]:
    """(what a pseudo-labeling run's work cost, what crashes added): each chunk once and the
    compiles of attempts that did not crash; the crashed attempts' compiles apart
    (`Ledger.work_usd`)."""
    return ledger.work_usd(run_id)


def teacher_fingerprint(params: Any) -> str:
    """A cheap fingerprint of a teacher's parameters: sha256 over every leaf's path, shape and
    dtype and its first and last 256 values.

    It reads only parameters already loaded for decoding (hashing them all would take long for
    an XXL teacher, sampling takes milliseconds), and it does not depend on where or in which
    format the checkpoint is stored, so a moved teacher still matches. Two checkpoints that differ
    only in unsampled weights would match; training moves every weight, so two teachers (or
    two steps of one) never do."""
    import hashlib

    digest = hashlib.sha256()

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for key in sorted(node, key=str):
                visit(node[key], f'{path}/{key}')
            return
        leaf = np.asarray(node)
        flat = leaf.reshape(-1)
        digest.update(f'{path}:{leaf.shape}:{leaf.dtype}'.encode())
        digest.update(np.ascontiguousarray(flat[:256]).tobytes())
        digest.update(np.ascontiguousarray(flat[-256:]).tobytes())

    visit(params, '')
    return digest.hexdigest()


def _fits_budget(ledger: Any, run_id: str, chunk_size: int, max_usd: float) -> bool:
    """Whether one more chunk, priced like the last one, keeps the run's work within max_usd:
    the chunks and compiles billed so far, less what crashes added (`work_usd`), so that a killed
    and rerun job buys what an uninterrupted one does."""
    if max_usd <= 0:
        return False
    entries = ledger.compute_entries(run_id, 'pseudo_label')
    if not entries:
        return True
    spent = work_usd(ledger, run_id)[0]   # the chunks and their compiles; a crash's overhead apart
    last = entries[-1]
    per_example = last['usd'] / (last['last'] - last['first'] + 1)
    return spent + per_example * chunk_size <= max_usd


class _Strided(Sequence):
    """A global-index view of one shard's examples (other indices are never touched)."""

    def __init__(self, mine: list[Example], shard_id: int, num_shards: int, total: int):
        self.mine, self.s, self.n, self.total = mine, shard_id, num_shards, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i):
        if (i - self.s) % self.n:
            raise IndexError(f'index {i} is not in shard {self.s} of {self.n}')
        return self.mine[(i - self.s) // self.n]
