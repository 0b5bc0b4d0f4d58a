"""Builds HF `transformers` T5 reference models for parity tests, avoiding the 5.x tying pitfall.

transformers 5.x turns `tie_word_embeddings=False` given to `T5Config(...)` into
`scale_decoder_outputs=False` but still ties `lm_head` to the shared embedding; setting the
attribute afterwards unties the head but also unties the encoder/decoder input embeddings.
The reference here passes the flag, sets the attribute, re-shares the input embeddings, and
asserts the result is what a T5 v1.1 checkpoint is.
"""

from __future__ import annotations

import numpy as np


def build_hf_t5(*, tied: bool, feed_forward_proj: str, seed: int = 0, **config):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.T5Config(tie_word_embeddings=tied, feed_forward_proj=feed_forward_proj,
                                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                      eos_token_id=1, **config)
    hf_config.tie_word_embeddings = tied
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    if tied:
        assert model.lm_head.weight is model.shared.weight
    else:
        assert model.lm_head.weight is not model.shared.weight, 'reference lm_head came out tied'
        assert getattr(hf_config, 'scale_decoder_outputs', False) is False
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
