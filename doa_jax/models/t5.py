"""The T5 encoder-decoder in flax.linen, with t5x's parameter names.

Parameter tree (unscanned):
  token_embedder/embedding
  encoder/relpos_bias/rel_embedding, encoder/layers_{i}/..., encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding, decoder/layers_{i}/..., decoder/decoder_norm/scale
  decoder/logits_dense/kernel                       (T5 v1.1 only; original T5 ties it)
With `scan_layers=True`, `layers_{i}` become one `layers` subtree with a leading layer axis
(logical name 'layers'); `scan.py` converts between the two layouts.

Batches follow t5x's EncDecFeatureConverter: encoder_input_tokens, decoder_input_tokens,
decoder_target_tokens (pad id 0), and for packed rows (several examples per row, as t5x trains by
default) encoder_segment_ids / decoder_segment_ids (1, 2, ... per example, 0 on padding) and
encoder_positions / decoder_positions (each token's position within its example). Packed rows
attend only within their own example: encoder self-attention, causal decoder self-attention and
cross-attention (decoder segment == encoder segment) are all masked by segment.

The relative-position bias of a packed row: an example's tokens sit at consecutive row offsets,
so for every pair that attends (same example) the row offsets differ exactly as the positions
within the example do, and the bias built from row offsets, (1, heads, q, k) and shared by all
rows, is each example's own. Per-token `*_positions`, when passed, build a (batch, heads, q, k)
bias instead (for rows whose positions are not consecutive offsets); the trainer passes segment
ids only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from doa_jax import ops as ops_lib
from doa_jax.models.config import T5Config
from doa_jax.models.layers import (Dense, Embed, MlpBlock, MultiHeadAttention,
                                   RelativePositionBiases, RMSNorm, constrain)

Array = jax.Array

_REMAT_POLICIES = {
    'full': None,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
}


def _dropout(x: Array, rate: float, deterministic: bool) -> Array:
    if rate > 0 and not deterministic:
        return nn.Dropout(rate)(x, deterministic=False)
    return x


def padding_mask(query_valid: Array, key_valid: Array) -> Array:
    """(batch, 1, q, k) boolean mask: True where neither side is padding."""
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
    """(batch, 1, q, k) boolean mask: True where query and key belong to the same packed
    example (segment ids; 0 marks padding and attends nowhere)."""
    same = query_segments[:, None, :, None] == key_segments[:, None, None, :]
    return same & (query_segments > 0)[:, None, :, None]


# Packing features of a batch (seqio.EncDecFeatureConverter(pack=True)), by their model argument.
PACKING_FEATURES = ('encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                    'decoder_positions')


def packing_inputs(batch: Any, positions: bool = False) -> dict[str, Array]:
    """The keyword arguments of `T5.__call__` that `batch` carries for packed rows: the segment
    ids, and with `positions` also the per-token positions (see the module docstring)."""
    keys = PACKING_FEATURES if positions else PACKING_FEATURES[:2]
    return {k: batch[k] for k in keys if k in batch}


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, bias: Array, mask: Array) -> tuple[Array, None]:
        cfg = self.config
        ops = ops_lib.for_config(cfg)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_attention_layer_norm')(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate,
                               cfg.float32_attention_logits, self.deterministic,
                               ops=ops, name='attention')(h, h, bias, mask)
        x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_mlp_layer_norm')(x)
        h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dtype, cfg.dropout_rate,
                     self.deterministic, ops=ops, name='mlp')(h)
        x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
        return constrain(x, ('batch', 'length', 'embed')), None


class DecoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, encoded: Array | None, self_bias: Array, self_mask: Array,
                 cross_mask: Array, decode_position: Array | None = None,
                 max_decode_length: int | None = None) -> tuple[Array, None]:
        cfg = self.config
        ops = ops_lib.for_config(cfg)
        attn = lambda name, is_cross: MultiHeadAttention(
                cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.dropout_rate,
                cfg.float32_attention_logits, self.deterministic, self.decode, is_cross,
                ops=ops, name=name)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_self_attention_layer_norm')(x)
        h = attn('self_attention', False)(h, h, self_bias, self_mask, decode_position,
                                          max_decode_length)
        x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_cross_attention_layer_norm')(x)
        h = attn('encoder_decoder_attention', True)(h, encoded, None, cross_mask)
        x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='pre_mlp_layer_norm')(x)
        h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dtype, cfg.dropout_rate,
                     self.deterministic, ops=ops, name='mlp')(h)
        x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
        return constrain(x, ('batch', 'length', 'embed')), None


def _wrap_layer(cls: type[nn.Module], config: T5Config, n_broadcast: int,
                length: int) -> type[nn.Module]:
    """Applies the configured remat policy and scan-over-layers to a layer class."""
    if config.remat_policy is not None:
        if config.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f'Unknown remat_policy {config.remat_policy!r}; '
                             f'choose one of {sorted(_REMAT_POLICIES)} or None.')
        cls = nn.remat(cls, policy=_REMAT_POLICIES[config.remat_policy],
                       prevent_cse=not config.scan_layers)
    if config.scan_layers:
        cls = nn.scan(cls, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast,) * n_broadcast, length=length,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
    return cls


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoder_input_tokens: Array, enable_dropout: bool = False,
                 segment_ids: Array | None = None, positions: Array | None = None) -> Array:
        cfg = self.config
        deterministic = not enable_dropout
        if positions is None:
            positions = jnp.arange(encoder_input_tokens.shape[1])
        pos_bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                          cfg.relative_attention_max_distance, cfg.num_heads,
                                          bidirectional=True, dtype=jnp.float32,
                                          name='relpos_bias')(positions, positions)
        valid = encoder_input_tokens > 0
        mask = padding_mask(valid, valid)
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, segment_ids)
        x = self.shared_embedding(encoder_input_tokens)
        x = _dropout(x, cfg.dropout_rate, deterministic)
        x = constrain(x, ('batch', 'length', 'embed'))
        layer = _wrap_layer(EncoderLayer, cfg, 2, cfg.num_encoder_layers)
        if cfg.scan_layers:
            x, _ = layer(cfg, deterministic, name='layers')(x, pos_bias, mask)
        else:
            for i in range(cfg.num_encoder_layers):
                x, _ = layer(cfg, deterministic, name=f'layers_{i}')(x, pos_bias, mask)
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='encoder_norm')(x)
        return _dropout(x, cfg.dropout_rate, deterministic)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: Array | None, encoder_valid: Array, decoder_input_tokens: Array,
                 decoder_valid: Array | None = None, enable_dropout: bool = False,
                 decode: bool = False, max_decode_length: int | None = None, *,
                 encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None,
                 positions: Array | None = None) -> Array:
        cfg = self.config
        deterministic = not enable_dropout
        relpos = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance, cfg.num_heads,
                                        bidirectional=False, dtype=jnp.float32,
                                        name='relpos_bias')
        batch, length = decoder_input_tokens.shape
        decode_position = None
        if decode:
            if decoder_segment_ids is not None or positions is not None:
                raise ValueError('Cached decoding runs on unpacked rows (one input per row); '
                                 'pass no segment ids or positions.')
            if cfg.scan_layers:
                raise ValueError('Cached decoding runs on the unscanned layout; convert the '
                                 'parameters with doa_jax.models.scan.unscan_params and use '
                                 'scan_layers=False.')
            step = self.variable('cache', 'decode_position', lambda: jnp.zeros((), jnp.int32))
            decode_position = step.value
            step.value = decode_position + 1
            key_positions = jnp.arange(max_decode_length)
            self_bias = relpos(decode_position[None], key_positions)
            self_mask = key_positions[None, None, None, :] <= decode_position
            cross_mask = encoder_valid[:, None, None, :]
        else:
            offsets = jnp.arange(length)
            self_bias = relpos(offsets if positions is None else positions,
                               offsets if positions is None else positions)
            # Causal by row offset: within a packed example, offsets and positions agree.
            causal = offsets[None, :] <= offsets[:, None]
            valid = decoder_valid if decoder_valid is not None else jnp.ones((batch, length), bool)
            self_mask = causal[None, None] & padding_mask(valid, valid)
            cross_mask = padding_mask(valid, encoder_valid)
            if decoder_segment_ids is not None:
                self_mask = self_mask & segment_mask(decoder_segment_ids, decoder_segment_ids)
                cross_mask = cross_mask & segment_mask(decoder_segment_ids, encoder_segment_ids)

        x = self.shared_embedding(decoder_input_tokens)
        x = _dropout(x, cfg.dropout_rate, deterministic)
        x = constrain(x, ('batch', 'length', 'embed'))
        layer = _wrap_layer(DecoderLayer, cfg, 4, cfg.num_decoder_layers)
        if cfg.scan_layers:
            x, _ = layer(cfg, deterministic, name='layers')(x, encoded, self_bias, self_mask,
                                                            cross_mask)
        else:
            for i in range(cfg.num_decoder_layers):
                x, _ = layer(cfg, deterministic, decode, name=f'layers_{i}')(
                        x, encoded, self_bias, self_mask, cross_mask, decode_position,
                        max_decode_length)
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name='decoder_norm')(x)
        x = _dropout(x, cfg.dropout_rate, deterministic)
        if cfg.logits_via_embedding:
            logits = self.shared_embedding.attend(x * (x.shape[-1] ** -0.5))
        else:
            logits = Dense(cfg.vocab_size, ('embed', 'vocab'), dtype=cfg.dtype,
                           ops=ops_lib.for_config(cfg), name='logits_dense')(x)
        return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


class T5(nn.Module):
    """Encoder-decoder with a shared token embedding (t5x: `token_embedder`)."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype,
                                    ops_lib.for_config(cfg))
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False,
               encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None) -> Array:
        return self.encoder(encoder_input_tokens, enable_dropout, encoder_segment_ids,
                            encoder_positions)

    def decode(self, encoded: Array | None, encoder_input_tokens: Array,
               decoder_input_tokens: Array, decoder_target_tokens: Array | None = None,
               enable_dropout: bool = False, decode: bool = False,
               max_decode_length: int | None = None, *,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
        """Decoder logits (float32). `decode=True` runs one cached step (see decoding.py)."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError('Packed rows need both encoder_segment_ids and decoder_segment_ids '
                             '(cross-attention matches a decoder segment to its encoder segment).')
        decoder_valid = None if decoder_target_tokens is None else decoder_target_tokens > 0
        return self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens,
                            decoder_valid, enable_dropout, decode, max_decode_length,
                            encoder_segment_ids=encoder_segment_ids,
                            decoder_segment_ids=decoder_segment_ids, positions=decoder_positions)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array | None = None,
                 enable_dropout: bool = False, *,
                 encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None,
                 encoder_positions: Array | None = None,
                 decoder_positions: Array | None = None) -> Array:
        """Teacher-forced logits; the segment ids (and optionally positions) of packed rows keep
        each example to itself (module docstring)."""
        encoded = self.encode(encoder_input_tokens, enable_dropout, encoder_segment_ids,
                              encoder_positions)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           decoder_target_tokens, enable_dropout,
                           encoder_segment_ids=encoder_segment_ids,
                           decoder_segment_ids=decoder_segment_ids,
                           decoder_positions=decoder_positions)
