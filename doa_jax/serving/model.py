"""A batched greedy generate function over a doa_jax T5 with the model's cached decoding.

Batches are padded to power-of-two sizes and input lengths so a server compiles a handful of
shapes, not one per request mix."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import linen as nn

from doa_jax.models.config import T5Config
from doa_jax.models.scan import unscan_params
from doa_jax.models.t5 import T5

EOS_ID = 1


def load_params(checkpoint: str, config: T5Config, seed: int = 0) -> Any:
    """'random' (fresh init, for tests and demos), a run dir (latest step of its checkpoints/),
    or one checkpoint step dir written by the trainer (`<model_dir>/checkpoints/<step>`)."""
    if checkpoint == 'random':
        model = T5(config)
        tokens = jnp.ones((1, 8), jnp.int32)
        return nn.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens)['params'])
    import orbax.checkpoint as ocp
    path = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        path = os.path.join(path, 'checkpoints')
    steps = [d for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if steps:
        path = os.path.join(path, max(steps, key=int))
    state_dir = os.path.join(path, 'state')
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f'--checkpoint={checkpoint}: no trainer checkpoint (expected '
                                f'{state_dir}); pass a model dir, a checkpoint step dir, or '
                                f'"random".')
    state = ocp.StandardCheckpointer().restore(state_dir)
    params = state['params'] if 'params' in state else state
    if config.scan_layers:
        params = unscan_params(params, config)
    return params


def make_generate_fn(config: T5Config, params: Any, vocabulary: seqio.Vocabulary,
                     max_input_length: int = 512, max_decode_length: int = 32):
    """prompts, max_tokens -> [(text, prompt_tokens, completion_tokens)]; greedy decoding."""
    if config.scan_layers:
        config = dataclasses.replace(config, scan_layers=False)
    model = T5(config)

    @functools.partial(jax.jit, static_argnums=2)
    def greedy(params, enc, length: int):
        batch = enc.shape[0]
        encoded = model.apply({'params': params}, enc, method=T5.encode)
        bos = jnp.zeros((batch, 1), jnp.int32)
        logits, state = model.apply({'params': params}, encoded, enc, bos, decode=True,
                                    max_decode_length=length, method=T5.decode,
                                    mutable=['cache'])
        first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

        def step(carry, _):
            cache, tok, done = carry
            logits, state = model.apply({'params': params, 'cache': cache}, None, enc,
                                        tok[:, None], decode=True, max_decode_length=length,
                                        method=T5.decode, mutable=['cache'])
            nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            nxt = jnp.where(done, 0, nxt)
            return (state['cache'], nxt, done | (nxt == EOS_ID)), nxt

        _, rest = jax.lax.scan(step, (state['cache'], first, first == EOS_ID), None,
                               length=length - 1)
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    def generate(prompts: Sequence[str], max_tokens: Sequence[int]) -> list[tuple[str, int, int]]:
        ids = [list(vocabulary.encode(p))[-(max_input_length - 1):] + [EOS_ID] for p in prompts]
        length = max(32, 1 << (max(map(len, ids)) - 1).bit_length())
        rows = 1 << (len(ids) - 1).bit_length()
        enc = np.zeros((rows, length), np.int32)
        for i, x in enumerate(ids):
            enc[i, :len(x)] = x
        out = np.asarray(greedy(params, jnp.asarray(enc), max_decode_length))
        results = []
        for i, x in enumerate(ids):
            toks = out[i, :max(1, min(max_tokens[i], max_decode_length))].tolist()
            if EOS_ID in toks:
                toks = toks[:toks.index(EOS_ID) + 1]
            text = vocabulary.decode([t for t in toks if t != EOS_ID])
            results.append((text, len(x), len(toks)))
        return results

    return generate
