"""Serve a doa_jax model over the OpenAI Chat Completions API shape, with request batching."""

from doa_jax.serving.batcher import (Batcher, BatcherClosedError, Generation, GenerateFn,
                                     QueueFullError)
from doa_jax.serving.model import load_params, make_generate_fn
from doa_jax.serving.server import ChatServer, bind_warning, is_loopback, messages_to_prompt

__all__ = ['Batcher', 'BatcherClosedError', 'ChatServer', 'Generation', 'GenerateFn',
           'QueueFullError', 'bind_warning', 'is_loopback', 'load_params', 'make_generate_fn',
           'messages_to_prompt']
