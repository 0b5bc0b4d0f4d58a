"""Label a task's unlabeled pool with an LLM over an OpenAI-compatible Chat Completions API.

    python -m doa_jax.annotate_llm --task=doa_fever --model=gpt-3.5-turbo \
        --base_url=https://api.openai.com/v1 --budget_usd=5 --output_dir=/tmp/fever_llm

or with plain files: --labeled_file=few_shot.jsonl --unlabeled_file=pool.jsonl --labels=yes,no.
The key comes from OPENAI_API_KEY. Exit status 3 means the budget stopped the run (re-run with a
larger --budget_usd to continue; cached answers are not paid again); 1 means the endpoint failed
(e.g. --max_connection_failures connection failures in a row).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Sequence

from doa_jax.cost.ledger import LEDGER_FILENAME, Ledger
from doa_jax.cost.prices import load_prices
from doa_jax import llm
from doa_jax.llm.annotate import REASK_MODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m doa_jax.annotate_llm', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', help='seqio task base name, e.g. doa_fever (uses '
                   '<task>_labeled_<N> for shots and <task>_unlabeled as the pool)')
    p.add_argument('--labeled_size', type=int, help='N of the labeled slice (default: smallest)')
    p.add_argument('--labeled_file', help='JSONL {"source","target"} few-shot candidates')
    p.add_argument('--unlabeled_file', help='JSONL {"source"[,"id"]} pool to label')
    p.add_argument('--labels', help='comma-separated label set (default: the task\'s; none = '
                   'generation)')
    p.add_argument('--model', required=True)
    p.add_argument('--price_model', help='price-table name if it differs from --model')
    p.add_argument('--base_url', default='https://api.openai.com/v1')
    p.add_argument('--output_dir', required=True)
    p.add_argument('--cache_path', help=f'default: <output_dir>.cache.sqlite')
    p.add_argument('--ledger', help=f'default: <output_dir>/../{LEDGER_FILENAME}')
    p.add_argument('--prices', help='price YAML overriding doa_jax/cost/prices.yaml')
    p.add_argument('--run_id', help='ledger run id (default: the output dir name)')
    p.add_argument('--budget_usd', type=float)
    p.add_argument('--k_shot', type=int, default=8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--instruction')
    p.add_argument('--max_tokens', type=int, default=32)
    p.add_argument('--temperature', type=float, default=0.0)
    p.add_argument('--num_shards', type=int, default=1)
    p.add_argument('--concurrency', type=int, default=4)
    p.add_argument('--max_retries', type=int, default=6, help='per request, on 429/5xx/timeouts')
    p.add_argument('--max_connection_failures', type=int, default=5,
                   help='connection failures in a row that stop the whole run (0: never)')
    p.add_argument('--max_invalid_retries', type=int, default=2, help='re-asks per bad answer')
    p.add_argument('--reask', choices=REASK_MODES, default='prompt',
                   help='how an unparseable answer is re-asked: prompt (add a correction naming '
                   'the labels), temperature (ask again at --reask_temperature) or same (only '
                   'useful at --temperature > 0); a request identical to one already sent is '
                   'never re-sent at temperature 0')
    p.add_argument('--reask_temperature', type=float, default=0.7)
    p.add_argument('--timeout_s', type=float, default=60.0)
    p.add_argument('--keep_invalid', action='store_true', help='write unparseable answers into '
                   'the shards too (default: <output_dir>.invalid.jsonl)')
    p.add_argument('--limit', type=int, help='label only the first N pool examples')
    p.add_argument('--no_progress', action='store_true')
    return p


def _inputs(args) -> tuple[list[llm.Example], list[llm.Example], list[str] | None]:
    labels = None
    if args.task:
        from doa_jax.data import paper
        spec = paper.DATASETS.get(args.task.removeprefix('doa_'))
        labels = list(spec.labels) if spec and spec.labels else None
        size = args.labeled_size or (min(spec.budget_sizes) if spec else None)
        if size is None:
            raise SystemExit(f'--task={args.task}: not a paper dataset; pass --labeled_size.')
        shots = llm.load_task_examples(f'{args.task}_labeled_{size}')
        pool = llm.load_task_examples(f'{args.task}_unlabeled')
    elif args.labeled_file and args.unlabeled_file:
        shots = llm.load_jsonl_examples(args.labeled_file, need_target=True)
        pool = llm.load_jsonl_examples(args.unlabeled_file, need_target=False)
    else:
        raise SystemExit('Pass --task=<seqio task> or both --labeled_file and --unlabeled_file.')
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(',') if x.strip()] or None
    return shots, pool, labels


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shots, pool, labels = _inputs(args)
    shots = random.Random(args.seed).sample(shots, min(args.k_shot, len(shots)))
    pool = pool[:args.limit] if args.limit else pool
    out = os.path.abspath(args.output_dir)
    client = llm.ChatClient(args.base_url, args.model, os.environ.get('OPENAI_API_KEY'),
                            args.timeout_s, args.max_retries,
                            max_connection_failures=args.max_connection_failures)
    cache = llm.ResponseCache(args.cache_path or out + '.cache.sqlite')
    ledger = Ledger(args.ledger or os.path.join(os.path.dirname(out), LEDGER_FILENAME))
    try:
        summary = llm.annotate(
                pool, shots, client=client, cache=cache, ledger=ledger,
                prices=load_prices(args.prices), run_id=args.run_id or os.path.basename(out),
                output_dir=out, labels=labels,
                instruction=args.instruction or llm.default_instruction(labels),
                params={'max_tokens': args.max_tokens, 'temperature': args.temperature},
                price_model=args.price_model, num_shards=args.num_shards,
                concurrency=args.concurrency, budget_usd=args.budget_usd,
                max_invalid_retries=args.max_invalid_retries, keep_invalid=args.keep_invalid,
                progress=not args.no_progress, reask=args.reask,
                reask_temperature=args.reask_temperature)
    except llm.LLMRequestError as e:
        print(f'python -m doa_jax.annotate_llm: error: {e}', file=sys.stderr, flush=True)
        return 1
    finally:
        client.close()
    print(f'labeled {summary.labeled} (invalid {summary.invalid}), {summary.requests} paid '
          f'requests, {summary.cached} cached, ${summary.usd:.6f} this run, '
          f'{summary.completed_shards}/{summary.num_shards} shards complete; retries '
          f'{client.retries or "none"}; re-asks not sent (same request at temperature 0) '
          f'{summary.reasks_skipped}', flush=True)
    if summary.stopped_for_budget:
        print(f'Stopped: --budget_usd={args.budget_usd} reached; re-run with a larger budget to '
              f'continue (cached answers are free).', file=sys.stderr)
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
