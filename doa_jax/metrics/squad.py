"""SQuAD exact match and token F1 (the official v1.1 answer normalisation), as the paper scored NQ."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = ''.join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r'\b(a|an|the)\b', ' ', text)
    return ' '.join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """EM and F1 in percent; a target may be one answer or a list (max over answers)."""
    if len(targets) != len(predictions):
        raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')
    em = f1 = 0.0
    for target, pred in zip(targets, predictions):
        answers = [target] if isinstance(target, str) else list(target)
        em += max(float(normalize_answer(pred) == normalize_answer(a)) for a in answers)
        f1 += max(token_f1(pred, a) for a in answers)
    n = max(len(targets), 1)
    return {'exact_match': 100.0 * em / n, 'f1': 100.0 * f1 / n}
