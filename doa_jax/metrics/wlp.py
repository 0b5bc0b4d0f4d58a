"""WLP entity metrics: the paper's per-entity label F1 (AMOUNT fallback) and exact span+type F1.

Targets look like `span [Label] span [Label] ...`. The paper keys each entity by its text and, for
every gold entity, takes the label the prediction gives that same text; an entity the prediction
lacks counts as AMOUNT. Its parser took the words between two labels *except the last one* as the
key (so one-word entities all share the empty key) and kept the last label per key; with
`paper_keys=True` (default) we reproduce that so numbers compare with the paper's, and
`paper_keys=False` keys by the full span text.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from doa_jax.metrics.classification import label_f1

WLP_LABELS = ('AMOUNT', 'REAGENT', 'DEVICE', 'TIME', 'SPEED', 'ACTION', 'MENTION', 'LOCATION',
              'NUMERICAL', 'METHOD', 'TEMPERATURE', 'MODIFIER', 'CONCENTRATION', 'SIZE',
              'GENERIC-MEASURE', 'SEAL', 'MEASURE-TYPE', 'MISC', 'PH', 'UNIT')
_LABEL_SET = frozenset(WLP_LABELS)


def _label_of(word: str) -> str | None:
    if word.startswith('[') and word.endswith(']') and word[1:-1].upper() in _LABEL_SET:
        return word[1:-1].upper()
    return None


def parse_entities(text: str) -> list[tuple[str, str]]:
    """(span text, LABEL) pairs in order; words after the last label are ignored."""
    out, span = [], []
    for word in text.split():
        label = _label_of(word)
        if label is None:
            span.append(word)
        else:
            out.append((' '.join(span), label))
            span = []
    return out


def _paper_entities(text: str) -> dict[str, str]:
    """The paper's keyed parse (see the module docstring): last word of each span dropped."""
    words, out, prev = text.split(), {}, -1
    for i, word in enumerate(words):
        # The paper tested '[' in word and ']' in word; a label token is exactly '[X]' in the data.
        if '[' in word and ']' in word and word[1:-1].upper() in _LABEL_SET:
            out[' '.join(words[prev + 1:i - 1])] = word[1:-1].upper()
            prev = i
    return out


def entity_label_pairs(targets: Sequence[str], predictions: Sequence[str],
                       paper_keys: bool = True) -> tuple[list[str], list[str]]:
    """Gold and predicted labels, one pair per gold entity."""
    gold_labels, pred_labels = [], []
    for i, (target, pred) in enumerate(zip(targets, predictions)):
        if paper_keys:
            gold, predicted = _paper_entities(target), _paper_entities(pred)
        else:
            gold, predicted = dict(parse_entities(target)), dict(parse_entities(pred))
        if not gold and target.strip():
            raise ValueError(f'WLP target #{i} {target[:80]!r} has no entity label; expected '
                             f'`span [Label] ...` with labels from {list(WLP_LABELS)}.')
        for entity, label in gold.items():
            gold_labels.append(label)
            pred_labels.append(predicted.get(entity, 'AMOUNT'))
    return gold_labels, pred_labels


def span_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Standard exact-match F1 over (span text, label) multisets per example, in percent."""
    tp = n_gold = n_pred = 0
    for target, pred in zip(targets, predictions):
        gold, predicted = collections.Counter(parse_entities(target)), collections.Counter(
            parse_entities(pred))
        tp += sum((gold & predicted).values())
        n_gold += sum(gold.values())
        n_pred += sum(predicted.values())
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {'span_precision': 100.0 * p, 'span_recall': 100.0 * r, 'span_f1': 100.0 * f}


def wlp_metrics(targets: Sequence[str], predictions: Sequence[str],
                paper_keys: bool = True) -> dict[str, float]:
    """The paper's micro/macro label F1 plus exact span+type F1, all in percent."""
    if len(targets) != len(predictions):
        raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')
    gold, pred = entity_label_pairs(targets, predictions, paper_keys)
    return {**label_f1(gold, pred), **span_f1(targets, predictions)}
