"""LLM annotation: few-shot prompts, an OpenAI-compatible client, a disk cache, label parsing."""

from doa_jax.llm.annotate import AnnotationSummary, Example, annotate, load_jsonl_examples, load_task_examples
from doa_jax.llm.cache import ResponseCache, cache_key
from doa_jax.llm.client import ChatClient, Completion, EndpointUnreachableError, LLMRequestError
from doa_jax.llm.prompts import build_messages, default_instruction, parse_output

__all__ = ['AnnotationSummary', 'ChatClient', 'Completion', 'EndpointUnreachableError', 'Example',
           'LLMRequestError', 'ResponseCache', 'annotate', 'build_messages', 'cache_key',
           'default_instruction', 'load_jsonl_examples', 'load_task_examples', 'parse_output']
