"""Label an unlabeled pool with an LLM: cached, budgeted, priced into the cost ledger, written as
JSONL shards with .COMPLETED markers (the layout pseudo-labeling uses, so the study can register
the output with tasks.register_pseudo_labeled_task)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import threading
from typing import Any, Mapping, Sequence

import tqdm

from doa_jax.cost.ledger import Ledger
from doa_jax.cost.prices import PriceTable, llm_cost_usd
from doa_jax.llm.cache import ResponseCache, cache_key
from doa_jax.llm.client import ChatClient
from doa_jax.llm.prompts import build_messages, correction_message, parse_output

STAGE = 'llm_annotation'
SHARD_NAME = 'llm_labels.jsonl-{:05d}-of-{:05d}'


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    source: str
    target: str = ''


@dataclasses.dataclass
class AnnotationSummary:
    labeled: int = 0
    invalid: int = 0
    invalid_outputs: int = 0       # every unparseable answer, re-asked ones included
    requests: int = 0              # paid requests this run
    cached: int = 0                # answers served from the disk cache (not paid again)
    usd: float = 0.0               # paid this run
    reused_usd: float = 0.0        # answers other runs paid, charged here (budget_counts_cached)
    reasks_skipped: int = 0        # re-asks not sent: the same request at temperature 0
    stopped_for_budget: bool = False
    completed_shards: int = 0
    num_shards: int = 0


REASK_MODES = ('prompt', 'temperature', 'same')


def load_jsonl_examples(path: str, need_target: bool) -> list[Example]:
    """{"source", "target"[, "id"]} lines; ids default to the line number."""
    from doa_jax.data.jsonl import read_jsonl
    fields = ('source', 'target') if need_target else ('source',)
    records, _ = read_jsonl(path, fields)
    return [Example(str(r.get('id', i)), r['source'], r.get('target', ''))
            for i, r in enumerate(records)]


def load_task_examples(task_name: str, split: str = 'train') -> list[Example]:
    """Examples of a registered seqio task ('id', 'inputs', 'targets' features, un-tokenized)."""
    import seqio
    import tasks  # noqa: F401  Registers the study's tasks.
    try:
        task = seqio.get_mixture_or_task(task_name)
    except ValueError as e:
        raise ValueError(f'--task: no seqio task {task_name!r} ({e}). Registered doa tasks: '
                         f'{", ".join(n for n in seqio.TaskRegistry.names() if n.startswith("doa"))}'
                         ) from e
    out = []
    for i, ex in enumerate(task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator()):
        get = lambda k: ex[k].decode() if k in ex else ''
        out.append(Example(get('id') or str(i), get('inputs'), get('targets')))
    return out


class _Budget:
    """Spent + conservatively reserved dollars; a request starts only if its worst case fits."""

    def __init__(self, limit_usd: float | None, spent_usd: float):
        self.limit, self.spent, self.reserved = limit_usd, spent_usd, 0.0
        self.exhausted = False
        self._lock = threading.Lock()

    def reserve(self, usd: float) -> bool:
        with self._lock:
            if self.limit is not None and self.spent + self.reserved + usd > self.limit:
                self.exhausted = True
                return False
            self.reserved += usd
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.reserved -= reserved
            self.spent += actual


def _write_shard(output_dir: str, index: int, num_shards: int, rows: list[dict],
                 complete: bool) -> None:
    path = os.path.join(output_dir, SHARD_NAME.format(index, num_shards))
    _atomic_write(path, rows)
    if complete:
        with open(path + '.COMPLETED', 'w') as f:
            f.write(f'{len(rows)}\n')


def _atomic_write(path: str, rows: Sequence[dict]) -> None:
    tmp = os.path.join(os.path.dirname(path), '.' + os.path.basename(path) + '.tmp')  # Hidden.
    with open(tmp, 'w') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _update_invalid(path: str, invalid: Sequence[dict], valid_ids: Sequence[str]) -> None:
    """One row per id in the invalid-answer file: a rerun replaces an example's row, and drops it
    once the example has a valid answer."""
    rows: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[str(row['id'])] = row
    for key in valid_ids:
        rows.pop(str(key), None)
    for row in invalid:
        rows[str(row['id'])] = row
    if rows or os.path.exists(path):
        _atomic_write(path, list(rows.values()))


def _reask(messages: list[dict], params: Mapping[str, Any], answer: str,
           labels: Sequence[str] | None, mode: str, temperature: float
           ) -> tuple[list[dict], dict]:
    """The request that re-asks after the unparseable `answer` (see `annotate`'s `reask`)."""
    if mode == 'prompt':
        return messages + [{'role': 'assistant', 'content': answer},
                           {'role': 'user', 'content': correction_message(labels)}], dict(params)
    if mode == 'temperature':
        return messages, {**params, 'temperature': temperature}
    return messages, dict(params)


class _OnePerKey:
    """Threads asking for the same cache key take turns, so a prompt is paid for once and the
    others read its answer from the cache."""

    def __init__(self):
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())


def annotate(pool: Sequence[Example], shots: Sequence[Example], *, client: ChatClient,
             cache: ResponseCache, ledger: Ledger, prices: PriceTable, run_id: str,
             output_dir: str, labels: Sequence[str] | None, instruction: str,
             params: Mapping[str, Any], price_model: str | None = None, num_shards: int = 1,
             concurrency: int = 4, budget_usd: float | None = None, max_invalid_retries: int = 2,
             keep_invalid: bool = False, progress: bool = True,
             budget_counts_cached: bool = False, reask: str = 'prompt',
             reask_temperature: float = 0.7) -> AnnotationSummary:
    """Labels `pool` shard by shard; finished shards (with .COMPLETED) are skipped on resume.

    The ledger is the money paid: each paid request is one row of stage 'llm_annotation' (range
    [i, i] of its example, keyed by its cache key), written as soon as the answer arrives and
    before it is cached, whether or not its example finishes. An answer served from the cache is
    not billed again; identical prompts in flight at once are asked once. `budget_usd` caps this
    run_id's ledger total: a request starts only when the spent dollars, all in-flight requests'
    worst cases and its own worst case fit.

    An unparseable answer is re-asked up to `max_invalid_retries` times, each time with a changed
    request: `reask='prompt'` adds the answer and a correction naming the labels to the
    conversation, 'temperature' asks again at `reask_temperature`, 'same' repeats the request. A
    request identical to one already sent for the example is not sent at temperature 0 (its
    reply would be the same): the example stays invalid.

    Rows whose answers never parsed go to `<output_dir>.invalid.jsonl` (one row per id), not into
    the shards (a pseudo-labeled task would train on them), unless `keep_invalid`.

    `budget_counts_cached=True` charges an answer that another run paid to this run at its token
    price, once (a row marked reused): the cap then bounds what the labels are worth, not only
    what this run pays (a study point that reuses another point's answers must not get more
    labels than its budget buys)."""
    if reask not in REASK_MODES:
        raise ValueError(f'reask={reask!r}; choose one of {REASK_MODES} (--reask).')
    price_model = price_model or client.model
    prices.llm_price(price_model)  # Fail before any request when the model has no price.
    max_tokens = int(params.get('max_tokens', 64))
    os.makedirs(output_dir, exist_ok=True)
    summary = AnnotationSummary(num_shards=num_shards)
    budget = _Budget(budget_usd, ledger.spent_usd(run_id))
    billed_keys, billed_examples = ledger.llm_billed(run_id, STAGE)
    shot_pairs = [(s.source, s.target) for s in shots]
    lock = threading.Lock()
    one_per_key = _OnePerKey()

    def worst_case(messages: list[dict]) -> float:
        # Upper bound on prompt tokens: one per UTF-8 byte (BPE vocabularies use fewer).
        n_in = sum(len(m['content'].encode()) for m in messages) + 16 * len(messages) + 16
        return llm_cost_usd(price_model, n_in, max_tokens, prices)

    def answer(index: int, key: str, messages: list[dict], request_params: Mapping[str, Any]
               ) -> dict | None:
        """The cached or newly paid answer to one request; None when the budget stops it."""
        with one_per_key(key):
            hit = cache.get(key)
            if hit is not None:
                with lock:
                    summary.cached += 1
                if not budget_counts_cached or key in billed_keys or index in billed_examples:
                    return hit    # paid by this run already, or not this run's to pay
                usd = llm_cost_usd(price_model, hit['prompt_tokens'], hit['completion_tokens'],
                                   prices)
                if not budget.reserve(usd):
                    return None
                try:
                    ledger.record_llm_request(run_id, STAGE, price_model, index, key,
                                              hit['prompt_tokens'], hit['completion_tokens'],
                                              usd, reused=True)
                finally:
                    budget.settle(usd, usd)
                with lock:
                    billed_keys.add(key)
                    summary.reused_usd += usd
                return hit
            reserve = worst_case(messages)
            if not budget.reserve(reserve):
                return None
            try:
                c = client.complete(messages, request_params)
            except BaseException:
                budget.settle(reserve, 0.0)  # A failed request is not billed.
                raise
            usd = llm_cost_usd(price_model, c.prompt_tokens, c.completion_tokens, prices)
            try:
                # Recorded before it is cached: a crash in between pays again on rerun, and
                # both payments are in the ledger.
                ledger.record_llm_request(run_id, STAGE, price_model, index, key,
                                          c.prompt_tokens, c.completion_tokens, usd)
            finally:
                budget.settle(reserve, usd)
            hit = {'text': c.text, 'prompt_tokens': c.prompt_tokens,
                   'completion_tokens': c.completion_tokens}
            cache.put(key, hit)
            with lock:
                billed_keys.add(key)
                summary.requests += 1
                summary.usd += usd
            return hit

    def label_one(index: int, ex: Example) -> dict | None:
        base = build_messages(instruction, shot_pairs, ex.source)
        messages, request_params = base, dict(params)
        sent: dict[str, int] = {}
        n_in = n_out = attempts = 0
        text, valid, raw = '', False, ''
        for attempt in range(max_invalid_retries + 1):
            ident = json.dumps([messages, request_params], sort_keys=True, ensure_ascii=False)
            repeat = sent.get(ident, 0)
            if repeat and float(request_params.get('temperature', 1.0)) == 0.0:
                with lock:
                    summary.reasks_skipped += 1
                break
            sent[ident] = repeat + 1
            # The first request's key is what older versions used for it (attempt 0).
            hit = answer(index, cache_key(client.model, messages, request_params, repeat),
                         messages, request_params)
            if hit is None:
                return None
            n_in += hit['prompt_tokens']
            n_out += hit['completion_tokens']
            attempts, raw = attempt + 1, hit['text']
            text, valid = parse_output(raw, labels)
            if valid:
                break
            with lock:
                summary.invalid_outputs += 1
            messages, request_params = _reask(base, params, raw, labels, reask,
                                              reask_temperature)
        return {'id': ex.id, 'input': ex.source, 'prediction': text if valid else '',
                'valid': valid, 'raw': raw, 'attempts': attempts,
                'prompt_tokens': n_in, 'completion_tokens': n_out}

    def show(bar: tqdm.tqdm) -> None:
        errors = sum(dict(getattr(client, 'retries', {})).values())
        bar.set_postfix_str(f'paid ${summary.usd:.4f}, cached {summary.cached}, invalid '
                            f'{summary.invalid}, errors {errors}', refresh=False)

    bounds = [(len(pool) * s // num_shards, len(pool) * (s + 1) // num_shards)
              for s in range(num_shards)]
    invalid_path = output_dir.rstrip('/') + '.invalid.jsonl'
    bar = tqdm.tqdm(total=len(pool), desc='LLM labels', disable=not progress)
    show(bar)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    try:
        for s, (lo, hi) in enumerate(bounds):
            marker = os.path.join(output_dir, SHARD_NAME.format(s, num_shards) + '.COMPLETED')
            if os.path.exists(marker):
                summary.completed_shards += 1
                bar.update(hi - lo)
                continue
            if budget.exhausted:
                break
            futures = [executor.submit(label_one, i, pool[i]) for i in range(lo, hi)]
            rows, invalid, finished = [], [], 0
            for f in futures:
                row = f.result()
                if row is not None:
                    finished += 1
                    summary.labeled += 1
                    summary.invalid += not row['valid']
                    (rows if row['valid'] or keep_invalid else invalid).append(row)
                show(bar)
                bar.update(1)
            complete = finished == hi - lo
            if rows or complete:
                _write_shard(output_dir, s, num_shards, rows, complete)
            if not keep_invalid:
                _update_invalid(invalid_path, invalid, [r['id'] for r in rows])
            summary.completed_shards += complete
    except BaseException:
        # A dead endpoint or an interrupt: queued examples are dropped, not tried one by one.
        executor.shutdown(wait=True, cancel_futures=True)
        show(bar)
        raise
    finally:
        bar.close()
    executor.shutdown(wait=True)
    summary.stopped_for_budget = budget.exhausted
    return summary
