"""Serve a doa_jax model over the OpenAI Chat Completions API shape, with request batching."""

from doa_jax.serving.batcher import Batcher, GenerateFn
from doa_jax.serving.model import load_params, make_generate_fn
from doa_jax.serving.server import ChatServer, messages_to_prompt

__all__ = ['Batcher', 'ChatServer', 'GenerateFn', 'load_params', 'make_generate_fn',
           'messages_to_prompt']
