"""Serve a doa_jax model over the OpenAI Chat Completions API on localhost, with batching.

    python -m doa_jax.serve --checkpoint=/runs/teacher --config=t5_1_1_base --port=8000
    python -m doa_jax.annotate_llm --base_url=http://127.0.0.1:8000/v1 --model=doa-local ...

--checkpoint=random serves a freshly initialised model (tests, demos); --vocabulary=byte uses
seqio.ByteVocabulary, anything else is a SentencePiece model path.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import seqio

from doa_jax.models.config import get_config
from doa_jax.serving import Batcher, ChatServer, load_params, make_generate_fn


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
    args = p.parse_args(argv)
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
    server = ChatServer(Batcher(generate, args.max_batch, args.batch_wait_ms), args.model,
                        args.host, args.port, args.test_faults, args.max_decode_length)
    print(f'serving {args.model} at {server.url}', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
