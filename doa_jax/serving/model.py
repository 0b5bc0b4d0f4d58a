"""A batched greedy generate function over `doa_jax.decoding.Decoder` (the model's cached decoding).

Batches are padded to the server's batch size and inputs to power-of-two length buckets, so a
server compiles one program per bucket, not one per request mix."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import linen as nn

from doa_jax import decoding, distributed
from doa_jax.models.config import T5Config
from doa_jax.models.t5 import T5
from doa_jax.serving.batcher import Generation

distributed.hide_gpus_from_tensorflow()   # before TF (seqio) can touch a GPU

EOS_ID = 1


def load_params(checkpoint: str, config: T5Config, seed: int = 0) -> Any:
    """'random' (fresh init, for tests and demos), a run dir (latest step of its checkpoints/),
    or one checkpoint step dir written by the trainer (`<model_dir>/checkpoints/<step>`)."""
    if checkpoint == 'random':
        model = T5(config)
        tokens = jnp.ones((1, 8), jnp.int32)
        return nn.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens)['params'])
    from doa_jax import checkpoints
    try:
        return checkpoints.load_checkpoint(checkpoint, config.replace(scan_layers=False))
    except FileNotFoundError as e:
        raise FileNotFoundError(f'--checkpoint={checkpoint}: no trainer checkpoint or other '
                                f'checkpoint doa_jax reads ({e}); pass a model dir, a checkpoint '
                                'step dir, an HF or t5x checkpoint, or "random".') from e


def make_generate_fn(config: T5Config, params: Any, vocabulary: seqio.Vocabulary,
                     max_input_length: int = 512, max_decode_length: int = 32,
                     batch_size: int = 16):
    """prompts, max_tokens -> [Generation(text, prompt_tokens, completion_tokens, finish_reason)];
    greedy decoding of up to `batch_size` prompts per call.

    An answer holds at most min(max_tokens, max_decode_length) tokens (EOS counted); finish_reason
    is 'stop' when the model ended it with EOS, 'length' when that limit cut it. A prompt longer
    than max_input_length - 1 tokens keeps its last tokens (the question at the end of a few-shot
    prompt survives); prompt_tokens counts what the model saw. The function carries its limits as
    attributes (max_input_length, max_decode_length) for the server's messages."""
    buckets = sorted({min(1 << n, max_input_length) for n in range(5, max_input_length.bit_length() + 1)}
                     | {max_input_length})
    decoder = decoding.Decoder(config, params, max_decode_length=max_decode_length,
                               batch_size=batch_size, length_buckets=buckets, eos_id=EOS_ID)

    def generate(prompts: Sequence[str], max_tokens: Sequence[int]) -> list[Generation]:
        ids = [list(vocabulary.encode(p))[-(max_input_length - 1):] + [EOS_ID] for p in prompts]
        out, _ = decoder(ids)
        results = []
        for i, x in enumerate(ids):
            toks = out[i, :max(1, min(max_tokens[i], max_decode_length))].tolist()
            stopped = EOS_ID in toks
            if stopped:
                toks = toks[:toks.index(EOS_ID) + 1]
            text = vocabulary.decode([t for t in toks if t != EOS_ID])
            results.append(Generation(text, len(x), len(toks), 'stop' if stopped else 'length'))
        return results

    generate.decoder = decoder
    generate.max_input_length = max_input_length
    generate.max_decode_length = max_decode_length
    return generate
