"""Serve a doa_jax model over the OpenAI Chat Completions API on localhost, with batching.

    python -m doa_jax.serve --checkpoint=/runs/teacher --config=t5_1_1_base --port=8000
    python -m doa_jax.annotate_llm --base_url=http://127.0.0.1:8000/v1 --model=doa-local ...

--checkpoint=random serves a freshly initialised model (tests, demos); --vocabulary=byte uses
seqio.ByteVocabulary, anything else is a SentencePiece model path.

The HTTP layer is starlette on uvicorn (doa_jax/serving/server.py): bodies over --max_body_bytes
get 413, wrong content types 415, unknown models and routes 404, requests that do not arrive within
--read_timeout_s 408, answers not ready within --request_timeout_s 504, and more than --max_queue
waiting requests 503. With --api_key (or DOA_API_KEY) every /v1 request needs
"Authorization: Bearer <key>". Binding a non-loopback --host without a key logs a warning.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import seqio

from doa_jax.models.config import get_config
from doa_jax.serving import Batcher, ChatServer, load_params, make_generate_fn
from doa_jax.serving.server import DEFAULT_MAX_BODY_BYTES


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m doa_jax.serve', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--config', default='t5_1_1_base', help='a NAMED_CONFIGS name')
    p.add_argument('--model', default='doa-local', help='model name the API reports')
    p.add_argument('--vocabulary', default='byte')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=8000, help='0 picks a free port')
    p.add_argument('--max_batch', type=int, default=16)
    p.add_argument('--batch_wait_ms', type=float, default=5.0)
    p.add_argument('--max_input_length', type=int, default=512)
    p.add_argument('--max_decode_length', type=int, default=32)
    p.add_argument('--test_faults', action='store_true', help='enable POST /test/faults')
    p.add_argument('--api_key', default=None,
                   help='require "Authorization: Bearer <key>" on every /v1 request; defaults to '
                        'the DOA_API_KEY environment variable (preferred: a flag shows in ps)')
    p.add_argument('--max_body_bytes', type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help='larger request bodies get 413')
    p.add_argument('--max_queue', type=int, default=1024,
                   help='requests waiting for a batch; past it, 503 with Retry-After')
    p.add_argument('--request_timeout_s', type=float, default=300.0,
                   help='an answer not ready in time gets 504')
    p.add_argument('--read_timeout_s', type=float, default=10.0,
                   help='time for a request head, and then for its body, to arrive (else 408)')
    p.add_argument('--max_connections', type=int, default=1024,
                   help='open connections; past it, 503')
    p.add_argument('--backlog', type=int, default=2048, help='listen queue of the socket')
    args = p.parse_args(argv)
    for flag in ('max_batch', 'max_body_bytes', 'max_queue', 'max_connections', 'backlog',
                 'max_input_length', 'max_decode_length'):
        if getattr(args, flag) < 1:
            p.error(f'--{flag}={getattr(args, flag)}: must be >= 1')
    for flag in ('request_timeout_s', 'read_timeout_s'):
        if not getattr(args, flag) > 0:
            p.error(f'--{flag}={getattr(args, flag)}: must be > 0 seconds')
    api_key = args.api_key if args.api_key is not None else os.environ.get('DOA_API_KEY')
    vocab = (seqio.ByteVocabulary() if args.vocabulary == 'byte'
             else seqio.SentencePieceVocabulary(args.vocabulary))
    config = get_config(args.config)
    if vocab.vocab_size > config.vocab_size:
        raise SystemExit(f'--vocabulary has {vocab.vocab_size} ids but --config={args.config} '
                         f'embeds {config.vocab_size}; pick the vocabulary the model was '
                         f'trained with.')
    params = load_params(args.checkpoint, config)
    generate = make_generate_fn(config, params, vocab, args.max_input_length,
                                args.max_decode_length, batch_size=args.max_batch)
    server = ChatServer(Batcher(generate, args.max_batch, args.batch_wait_ms, args.max_queue),
                        args.model, args.host, args.port, args.test_faults,
                        args.max_decode_length, api_key=api_key,
                        max_body_bytes=args.max_body_bytes,
                        request_timeout_s=args.request_timeout_s,
                        read_timeout_s=args.read_timeout_s, max_connections=args.max_connections,
                        backlog=args.backlog)
    print(f'serving {args.model} at {server.url}' + (' (API key required)' if api_key else ''),
          flush=True)
    try:
        server.serve_forever()  # Until SIGINT or SIGTERM.
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
