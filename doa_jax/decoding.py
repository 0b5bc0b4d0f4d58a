"""Autoregressive decoding for T5 with a KV cache: greedy, temperature/top-k sampling, beam search.

How the cache is used (see `MultiHeadAttention`): the first decoder step runs outside the loop and
creates the cache — zeroed self-attention K/V buffers of `max_decode_length` and the cross-attention
K/V, projected from the encoder outputs once. Every later step runs inside one `lax.while_loop`,
writes one position of the self-attention buffers with `dynamic_update_slice`, reads the cached
cross K/V, and the loop exits as soon as every row has produced EOS.

Outputs are (batch, max_decode_length) token ids without the decoder start token, zero-padded
after EOS, plus per-sequence scores (the sum of token log-probs; for beam search the length-penalised
score that ranked the beam).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import ops as ops_lib
from doa_jax.losses import first_argmax
from doa_jax.models.config import T5Config
from doa_jax.models.scan import unscan_params
from doa_jax.models.t5 import T5

Array = jax.Array
NEG_INF = -1.0e7

METHODS = ('greedy', 'sample', 'beam')


def cast_matmul_params(params: Any, dtype: Any) -> Any:
    """Dense kernels and the token embedding in the compute `dtype`, cast once.

    The model casts exactly these to its dtype at every use (norm scales and relative-position
    tables stay float32), so the results are unchanged; a decode loop then streams half the weight
    bytes per step instead of re-converting float32 weights at every step.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        name = getattr(path[-1], 'key', None) if path else None
        if name in ('kernel', 'embedding') and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)


def decode_config(config: T5Config) -> T5Config:
    """The config decoding runs: unscanned layers, no remat (decoding never differentiates)."""
    return config.replace(scan_layers=False, remat_policy=None)


def prepare_params(params: Any, config: T5Config) -> tuple[Any, T5Config]:
    """Params and config as decoding runs them: unboxed, unscanned, matmul weights in the compute
    dtype, no remat. Idempotent, so callers may prepare once and place the result themselves.
    Cast before unscanning: the unscanned copy a scanned model's evaluation makes beside its train
    state is then in the compute dtype, not float32."""
    params = nn.unbox(params)
    if jnp.dtype(config.dtype) != jnp.float32:
        params = cast_matmul_params(params, config.dtype)
    if config.scan_layers:
        params = unscan_params(params, config)
    return params, decode_config(config)


def _first_step(model: T5, weights, encoded, encoder_input_tokens, max_decode_length):
    batch = encoder_input_tokens.shape[0]
    start = jnp.zeros((batch, 1), jnp.int32)
    logits, variables = model.apply(
            weights, encoded, encoder_input_tokens, start, decode=True,
            max_decode_length=max_decode_length, mutable=['cache'], method=T5.decode)
    return logits[:, 0], variables['cache']


def _next_step(model: T5, weights, cache, encoder_input_tokens, tokens, max_decode_length):
    logits, variables = model.apply(
            {**weights, 'cache': cache}, None, encoder_input_tokens, tokens[:, None],
            decode=True, max_decode_length=max_decode_length, mutable=['cache'], method=T5.decode)
    return logits[:, 0], variables['cache']


def _filter_logits(logits: Array, temperature: float, top_k: int) -> Array:
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    return logits


def _sampling_decode(weights, config: T5Config, encoder_input_tokens: Array, *,
                     max_decode_length: int, eos_id: int, temperature: float, top_k: int,
                     rng: Array | None) -> tuple[Array, Array, Array]:
    """Greedy (temperature == 0) or sampled decoding; returns (tokens, scores, steps_run)."""
    model = T5(config)
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError('Sampling (temperature > 0) needs an `rng` key.')
    batch = encoder_input_tokens.shape[0]
    encoded = model.apply(weights, encoder_input_tokens, method=T5.encode)

    def choose(logits, step):
        logits = logits.astype(jnp.float32)
        if greedy:
            token = first_argmax(logits)
        else:
            key = jax.random.fold_in(rng, step)
            token = jax.random.categorical(key, _filter_logits(logits, temperature, top_k))
            token = token.astype(jnp.int32)
        # log p(token) = logit - logsumexp: two reductions, no (batch, vocab) log-softmax array.
        chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
        return token, chosen - jax.nn.logsumexp(logits, axis=-1)

    logits, cache = _first_step(model, weights, encoded, encoder_input_tokens, max_decode_length)
    token, logp = choose(logits, 0)
    out = jnp.zeros((batch, max_decode_length), jnp.int32).at[:, 0].set(token)
    ended = token == eos_id
    state = (jnp.array(1, jnp.int32), token, out, ended, logp, cache)

    def cond(state):
        step, _, _, ended, _, _ = state
        return (step < max_decode_length) & ~jnp.all(ended)

    def body(state):
        step, token, out, ended, score, cache = state
        logits, cache = _next_step(model, weights, cache, encoder_input_tokens, token,
                                   max_decode_length)
        new, logp = choose(logits, step)
        new = jnp.where(ended, 0, new)
        score = score + jnp.where(ended, 0.0, logp)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        return step + 1, new, out, ended | (new == eos_id), score, cache

    steps, _, out, _, score, _ = jax.lax.while_loop(cond, body, state)
    return out, score, steps


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT / t5x length penalty ((5 + length) / 6) ** alpha; alpha = 0 ranks by log-prob sum."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _is_self_attention_cache(path) -> bool:
    return any(getattr(k, 'key', None) == 'self_attention' for k in path)


def _gather_beams(tree, beam_indices: Array, batch: int, beams: int, only_self_attention: bool):
    """Reorders the (batch * beams, ...) leaves of `tree` by per-row beam indices (batch, beams)."""

    def gather(path, x):
        if x.ndim == 0 or (only_self_attention and not _is_self_attention_cache(path)):
            return x
        x = x.reshape((batch, beams) + x.shape[1:])
        idx = beam_indices.reshape((batch, beams) + (1,) * (x.ndim - 2))
        x = jnp.take_along_axis(x, idx, axis=1)
        return x.reshape((batch * beams,) + x.shape[2:])

    return jax.tree_util.tree_map_with_path(gather, tree)


def _beam_decode(weights, config: T5Config, encoder_input_tokens: Array, *, max_decode_length: int,
                 eos_id: int, num_beams: int, alpha: float) -> tuple[Array, Array, Array]:
    """Beam search; returns (best tokens, best scores, steps_run).

    Each step expands every alive beam, keeps the top 2*beams candidates, moves candidates that
    end in EOS *and rank among the top `beams`* to the finished set (scored sum_logp /
    length_penalty), and continues with the best `beams` candidates that did not end. The search
    stops when no alive beam can beat the worst finished one. At the end, alive beams compete with
    the finished ones. With alpha = 0 this is exactly HF `generate(num_beams=k,
    length_penalty=0.0, early_stopping=False)`.
    """
    model = T5(config)
    batch, src_len = encoder_input_tokens.shape
    k, length = num_beams, max_decode_length
    # Encode each input once, then give every beam its copy of the encoder outputs.
    encoded = model.apply(weights, encoder_input_tokens, method=T5.encode)
    encoded = jnp.repeat(encoded, k, axis=0)
    expanded = jnp.repeat(encoder_input_tokens, k, axis=0)
    vocab = config.vocab_size

    logits, cache = _first_step(model, weights, encoded, expanded, length)
    # Only beam 0 of each row is live before the first expansion.
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
    alive_seq = jnp.zeros((batch, k, length), jnp.int32)
    fin_seq = jnp.zeros((batch, k, length), jnp.int32)
    fin_score = jnp.full((batch, k), NEG_INF)
    max_penalty = length_penalty(jnp.array(length), alpha)

    def expand(step, logits, alive_logp, alive_seq, fin_seq, fin_score):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        cand = (alive_logp[:, :, None] + logp).reshape(batch, k * vocab)
        cand_logp, cand_idx = jax.lax.top_k(cand, 2 * k)
        beam, token = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seq, beam[:, :, None], axis=1)
        seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, step))
        is_eos = token == eos_id
        # Finished candidates: EOS among the top `k` ranks.
        rank_ok = jnp.arange(2 * k)[None, :] < k
        new_fin = jnp.where(is_eos & rank_ok,
                            cand_logp / length_penalty(jnp.array(step + 1), alpha), NEG_INF)
        all_seq = jnp.concatenate([fin_seq, seqs], axis=1)
        all_score = jnp.concatenate([fin_score, new_fin], axis=1)
        fin_score, top = jax.lax.top_k(all_score, k)
        fin_seq = jnp.take_along_axis(all_seq, top[:, :, None], axis=1)
        # Alive: best k candidates that did not end.
        alive_cand = jnp.where(is_eos, NEG_INF, cand_logp)
        alive_logp, keep = jax.lax.top_k(alive_cand, k)
        alive_seq = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
        parent = jnp.take_along_axis(beam, keep, axis=1)
        next_tokens = jnp.take_along_axis(token, keep, axis=1)
        return alive_logp, alive_seq, fin_seq, fin_score, parent, next_tokens

    alive_logp, alive_seq, fin_seq, fin_score, parent, tokens = expand(
            0, logits, alive_logp, alive_seq, fin_seq, fin_score)
    cache = _gather_beams(cache, parent, batch, k, only_self_attention=True)

    def done(alive_logp, fin_score):
        best_possible = alive_logp[:, 0] / max_penalty
        return jnp.all(fin_score[:, -1] >= best_possible)

    def cond(state):
        step, alive_logp, _, _, fin_score, _, _ = state
        return (step < length) & ~done(alive_logp, fin_score)

    def body(state):
        step, alive_logp, alive_seq, fin_seq, fin_score, tokens, cache = state
        logits, cache = _next_step(model, weights, cache, expanded, tokens.reshape(-1), length)
        alive_logp, alive_seq, fin_seq, fin_score, parent, tokens = expand(
                step, logits, alive_logp, alive_seq, fin_seq, fin_score)
        cache = _gather_beams(cache, parent, batch, k, only_self_attention=True)
        return step + 1, alive_logp, alive_seq, fin_seq, fin_score, tokens, cache

    state = (jnp.array(1, jnp.int32), alive_logp, alive_seq, fin_seq, fin_score, tokens, cache)
    steps, alive_logp, alive_seq, fin_seq, fin_score, _, _ = jax.lax.while_loop(cond, body, state)
    # Alive beams that reached the length limit compete with the finished ones.
    alive_score = alive_logp / length_penalty(steps, alpha)
    all_seq = jnp.concatenate([fin_seq, alive_seq], axis=1)
    all_score = jnp.concatenate([fin_score, alive_score], axis=1)
    best = jnp.argmax(all_score, axis=1)
    tokens = jnp.take_along_axis(all_seq, best[:, None, None], axis=1)[:, 0]
    score = jnp.take_along_axis(all_score, best[:, None], axis=1)[:, 0]
    # Zero anything after the first EOS (beams carry no tokens there, but be explicit).
    after_eos = jnp.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
    return jnp.where(after_eos, 0, tokens), score, steps


def generate(params: Any, config: T5Config, encoder_input_tokens: Array, *, max_decode_length: int,
             method: str = 'greedy', num_beams: int = 4, length_penalty: float = 0.6,
             temperature: float = 1.0, top_k: int = 0, rng: Array | None = None, eos_id: int = 1,
             return_scores: bool = True, return_steps: bool = False,
             prepared: Any | None = None):
    """Decodes a batch; the traceable core of `Decoder`, which is how the project decodes (jitted,
    length-bucketed, weights prepared once).

    method: 'greedy'; 'sample' (temperature, top_k; temperature 0 is greedy); 'beam' (num_beams,
    GNMT `length_penalty` alpha). `prepared`: the weights laid out for the config's matmul
    backend (`ops.prepare_weights`), when the caller made them once; otherwise they are made here,
    once per call. Returns tokens (batch, max_decode_length) [, scores] [, steps].
    """
    if method not in METHODS:
        raise ValueError(f'Unknown decoding method {method!r}; choose one of {METHODS}.')
    if max_decode_length < 1:
        raise ValueError(f'max_decode_length must be >= 1, got {max_decode_length}.')
    params, config = prepare_params(params, config)
    if prepared is None:
        prepared = ops_lib.prepare_weights(params, config)
    weights = {'params': params, ops_lib.PREPARED: prepared}
    encoder_input_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    if method == 'beam':
        tokens, scores, steps = _beam_decode(weights, config, encoder_input_tokens,
                                             max_decode_length=max_decode_length, eos_id=eos_id,
                                             num_beams=num_beams, alpha=length_penalty)
    else:
        tokens, scores, steps = _sampling_decode(
                weights, config, encoder_input_tokens, max_decode_length=max_decode_length,
                eos_id=eos_id, temperature=0.0 if method == 'greedy' else temperature,
                top_k=top_k, rng=rng)
    out = (tokens,)
    if return_scores:
        out += (scores,)
    if return_steps:
        out += (steps,)
    return out[0] if len(out) == 1 else out


def decoded_lengths(tokens: Array | np.ndarray, eos_id: int = 1) -> np.ndarray:
    """Lengths of decoded rows including their EOS (0-padding excluded), for detokenizing.

    `vocab.decode(row[:n])` with a seqio vocabulary then gives the text; seqio stops at EOS itself.
    """
    tokens = np.asarray(tokens)
    is_eos = tokens == eos_id
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, (tokens != 0).sum(axis=1))
    return first.astype(np.int32)


DEFAULT_BUCKETS = (32, 64, 128, 256, 512)


class Decoder:
    """The one way doa_jax decodes: jitted, inputs padded to length buckets and batches to
    `batch_size`, weights prepared once per set of parameters.

    Trainer evaluation, pseudo-labeling, serving and the benchmarks all decode through it, so a
    stream of batches compiles once per bucket (`compile_count` counts traces) and the weights are
    cast, unscanned and laid out for the matmul backend once (`prepare`), not per batch.

    - `Decoder(config, params, ...)` then `decoder(rows)`: host inputs (lists of ids or a padded
      array), padded here; returns numpy tokens and scores.
    - `decoder.decode_batch(tokens)`: an already padded (possibly sharded, global) array of a
      fixed shape; returns device arrays. `load(params)` swaps in new parameters (a trainer's
      evaluation does this every time) without recompiling.
    `jit_kwargs` (e.g. `in_shardings`/`out_shardings` over a mesh) go to `jax.jit` unchanged; the
    jitted function takes (weights, tokens, rng), weights as `prepare` returns them. It may also
    be a function of the first weights that returns those kwargs (to shard like the weights).
    """

    def __init__(self, config: T5Config, params: Any | None = None, *, max_decode_length: int,
                 batch_size: int, length_buckets: Sequence[int] = DEFAULT_BUCKETS,
                 method: str = 'greedy', eos_id: int = 1,
                 jit_kwargs: dict | Callable[[Any], dict] | None = None, **generate_kwargs):
        if method not in METHODS:
            raise ValueError(f'Unknown decoding method {method!r}; choose one of {METHODS}.')
        if batch_size < 1:
            raise ValueError(f'Decoder batch_size must be >= 1, got {batch_size}.')
        self.config, self.batch_size = config, batch_size
        self.max_decode_length = max_decode_length
        self.buckets = tuple(sorted(length_buckets))
        self._config = decode_config(config)
        self.compile_count = 0
        self.weights = None

        def run(weights, tokens, rng):
            self.compile_count += 1   # runs only while tracing, i.e. once per new shape
            return generate(weights['params'], self._config, tokens,
                            max_decode_length=max_decode_length, method=method, eos_id=eos_id,
                            rng=rng, return_scores=True, prepared=weights[ops_lib.PREPARED],
                            **generate_kwargs)

        self._fn, self._jit_kwargs, self._jitted = run, jit_kwargs, None
        if params is not None:
            self.load(params)

    def _run(self, weights, tokens, rng):
        return self._jit(weights)(weights, tokens, rng)

    def _jit(self, weights):
        if self._jitted is None:   # one jitted function for the decoder's life
            kwargs = self._jit_kwargs(weights) if callable(self._jit_kwargs) else self._jit_kwargs
            self._jitted = jax.jit(self._fn, **(kwargs or {}))
        return self._jitted

    def prepare(self, params: Any) -> dict:
        """{'params': unscanned params with matmul weights in the compute dtype, 'prepared': the
        weights laid out for the matmul backend}: what the jitted decode reads."""
        params, config = prepare_params(params, self.config)
        return {'params': params, ops_lib.PREPARED: ops_lib.prepare_weights(params, config)}

    def load(self, params: Any) -> 'Decoder':
        self.weights = self.prepare(params)
        return self

    def _weights(self):
        if self.weights is None:
            raise ValueError('This Decoder has no parameters yet; pass params to Decoder(...) or '
                             'call decoder.load(params).')
        return self.weights

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f'Input of {length} tokens exceeds the largest length bucket '
                         f'{self.buckets[-1]}; add a bucket or truncate inputs '
                         '(TASK_FEATURE_LENGTHS["inputs"]).')

    def lower(self, weights: Any, encoder_input_tokens: Any, rng: Any = None):
        """The jitted decode lowered for these (possibly abstract) weights and tokens."""
        return self._jit(weights).lower(weights, encoder_input_tokens,
                                        jax.random.PRNGKey(0) if rng is None else rng)

    def trace(self, weights: Any, encoder_input_tokens: Any, rng: Any = None):
        """The jitted decode traced for these (possibly abstract) weights and tokens; its
        `.lower(lowering_platforms=('cuda',))` lowers it for another platform than this one."""
        return self._jit(weights).trace(weights, encoder_input_tokens,
                                        jax.random.PRNGKey(0) if rng is None else rng)

    def decode_batch(self, encoder_input_tokens: Array, rng: Array | None = None
                     ) -> tuple[Array, Array]:
        """Decodes an already padded (batch, length) array as it is (device arrays back)."""
        return self._run(self._weights(), encoder_input_tokens,
                         jax.random.PRNGKey(0) if rng is None else rng)

    def pad(self, inputs: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """1 to `batch_size` inputs (lists of ids or a padded array, pad id 0) as the host array
        `decode_batch` takes: `batch_size` rows, padded to the inputs' length bucket."""
        rows = [np.trim_zeros(np.asarray(r, np.int32), 'b') for r in inputs]
        if len(rows) > self.batch_size:
            raise ValueError(f'Got {len(rows)} inputs for a decoder with batch_size '
                             f'{self.batch_size}; split the batch.')
        bucket = self.bucket_for(max(len(r) for r in rows))
        padded = np.zeros((self.batch_size, bucket), np.int32)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
        return padded

    def __call__(self, inputs: Sequence[Sequence[int]] | np.ndarray,
                 rng: Array | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decodes up to `batch_size` inputs (lists of ids or a padded array, pad id 0)."""
        if not len(inputs):
            return np.zeros((0, 0), np.int32), np.zeros((0,), np.float32)
        tokens, scores = self.decode_batch(self.pad(inputs), rng)
        n = len(inputs)
        return np.asarray(tokens)[:n], np.asarray(scores)[:n]
