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
from doa_jax.llm.prompts import build_messages, parse_output

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
    cached: int = 0                # answers served from the disk cache
    usd: float = 0.0               # paid this run
    stopped_for_budget: bool = False
    completed_shards: int = 0
    num_shards: int = 0


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
    tmp = os.path.join(output_dir, '.' + os.path.basename(path) + '.tmp')  # Hidden from globs.
    with open(tmp, 'w') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if complete:
        with open(path + '.COMPLETED', 'w') as f:
            f.write(f'{len(rows)}\n')


def annotate(pool: Sequence[Example], shots: Sequence[Example], *, client: ChatClient,
             cache: ResponseCache, ledger: Ledger, prices: PriceTable, run_id: str,
             output_dir: str, labels: Sequence[str] | None, instruction: str,
             params: Mapping[str, Any], price_model: str | None = None, num_shards: int = 1,
             concurrency: int = 4, budget_usd: float | None = None, max_invalid_retries: int = 2,
             keep_invalid: bool = False, progress: bool = True,
             budget_counts_cached: bool = False) -> AnnotationSummary:
    """Labels `pool` shard by shard; finished shards (with .COMPLETED) are skipped on resume.

    Each example's tokens, over all its attempts, are recorded once in the ledger as the range
    [i, i] of stage 'llm_annotation', so a resumed run (answers from the cache) records nothing
    twice. `budget_usd` caps this run_id's ledger total: a request starts only when the spent
    dollars, all in-flight requests' worst cases and its own worst case fit.

    Rows whose answers never parsed go to `<output_dir>.invalid.jsonl`, not into the shards (a
    pseudo-labeled task would train on them), unless `keep_invalid`.

    `budget_counts_cached=True` charges cached answers against `budget_usd` at their token price
    too: the cap then bounds what the labels are worth, not only what this run pays (a study
    point that reuses another point's answers must not get more labels than its budget buys)."""
    price_model = price_model or client.model
    prices.llm_price(price_model)  # Fail before any request when the model has no price.
    max_tokens = int(params.get('max_tokens', 64))
    os.makedirs(output_dir, exist_ok=True)
    summary = AnnotationSummary(num_shards=num_shards)
    budget = _Budget(budget_usd, ledger.spent_usd(run_id))
    shot_pairs = [(s.source, s.target) for s in shots]
    lock = threading.Lock()

    def worst_case(messages: list[dict]) -> float:
        # Upper bound on prompt tokens: one per UTF-8 byte (BPE vocabularies use fewer).
        n_in = sum(len(m['content'].encode()) for m in messages) + 16 * len(messages) + 16
        return llm_cost_usd(price_model, n_in, max_tokens, prices)

    def label_one(index: int, ex: Example) -> dict | None:
        messages = build_messages(instruction, shot_pairs, ex.source)
        n_in = n_out = 0
        text, valid, attempts = '', False, 0
        for attempt in range(max_invalid_retries + 1):
            key = cache_key(client.model, messages, params, attempt)
            hit = cache.get(key)
            if hit is None:
                reserve = worst_case(messages)
                if not budget.reserve(reserve):
                    return None
                try:
                    c = client.complete(messages, params)
                except BaseException:
                    budget.settle(reserve, 0.0)  # Conservative: a failed request is not billed.
                    raise
                hit = {'text': c.text, 'prompt_tokens': c.prompt_tokens,
                       'completion_tokens': c.completion_tokens}
                cache.put(key, hit)
                budget.settle(reserve, llm_cost_usd(price_model, c.prompt_tokens,
                                                    c.completion_tokens, prices))
                with lock:
                    summary.requests += 1
                    summary.usd += llm_cost_usd(price_model, c.prompt_tokens,
                                                c.completion_tokens, prices)
            else:
                if budget_counts_cached:
                    usd = llm_cost_usd(price_model, hit['prompt_tokens'],
                                       hit['completion_tokens'], prices)
                    if not budget.reserve(usd):
                        return None
                    budget.settle(usd, usd)
                with lock:
                    summary.cached += 1
            n_in += hit['prompt_tokens']
            n_out += hit['completion_tokens']
            attempts = attempt + 1
            text, valid = parse_output(hit['text'], labels)
            if valid:
                break
            with lock:
                summary.invalid_outputs += 1
        ledger.record_llm(run_id, STAGE, price_model, index, index, n_in, n_out,
                          llm_cost_usd(price_model, n_in, n_out, prices))
        return {'id': ex.id, 'input': ex.source, 'prediction': text if valid else '',
                'valid': valid, 'raw': hit['text'], 'attempts': attempts,
                'prompt_tokens': n_in, 'completion_tokens': n_out}

    bounds = [(len(pool) * s // num_shards, len(pool) * (s + 1) // num_shards)
              for s in range(num_shards)]
    bar = tqdm.tqdm(total=len(pool), desc='LLM labels', disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as executor:
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
                bar.update(1)
                if row is not None:
                    finished += 1
                    summary.labeled += 1
                    summary.invalid += not row['valid']
                    (rows if row['valid'] or keep_invalid else invalid).append(row)
            complete = finished == hi - lo
            if rows or complete:
                _write_shard(output_dir, s, num_shards, rows, complete)
            if invalid:
                with open(output_dir.rstrip('/') + '.invalid.jsonl', 'a') as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in invalid)
            summary.completed_shards += complete
    bar.close()
    summary.stopped_for_budget = budget.exhausted
    return summary
