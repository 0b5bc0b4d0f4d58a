"""Label metrics for the classification tasks (scikit-learn), scored the way the paper scored them.

Labels compare case-insensitively after stripping, as the paper's post-processing did. A gold label
outside the task's label set is a data error; a prediction outside it is a model error and scores
as wrong (accuracy) or as the paper's fallback class (F1).
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn import metrics as skm

FEVER_LABELS = ('SUPPORTS', 'REFUTES')
MULTIPIT_ID_LABELS = ('YES', 'NO')
# The first label is the paper's fallback for unparseable predictions in F1 scoring.
STANCE_LABELS = ('IRRELEVANT', 'SUPPORTING', 'REFUTING', 'DISCUSSING', 'QUERYING')


def _gold(targets: Sequence[str], labels: Sequence[str]) -> list[str]:
    known = set(labels)
    out = []
    for i, t in enumerate(targets):
        label = t.strip().upper()
        if label not in known:
            raise ValueError(f'target #{i} is {t!r}, not one of {list(labels)}; the evaluation '
                             'split holds a label this metric does not know (wrong task or metric).')
        out.append(label)
    return out


def accuracy(targets: Sequence[str], predictions: Sequence[str],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy in percent; a prediction outside `labels` never matches."""
    if len(targets) != len(predictions):
        raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')
    gold = _gold(targets, labels) if labels else [t.strip().upper() for t in targets]
    pred = [p.strip().upper() for p in predictions]
    if labels:
        pred = [p if p in set(labels) else '<unknown>' for p in pred]
    return {'accuracy': 100.0 * skm.accuracy_score(gold, pred)}


def label_f1(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Micro and macro precision/recall/F1 in percent over the labels seen in gold or pred."""
    out = {}
    for average in ('micro', 'macro'):
        p, r, f, _ = skm.precision_recall_fscore_support(gold, pred, average=average,
                                                         zero_division=0)
        out.update({f'{average}_precision': 100.0 * p, f'{average}_recall': 100.0 * r,
                    f'{average}_f1': 100.0 * f})
    return out


def classification_f1(targets: Sequence[str], predictions: Sequence[str],
                      labels: Sequence[str]) -> dict[str, float]:
    """The paper's F1: unknown predictions become labels[0] (its fallback class id 0)."""
    if len(targets) != len(predictions):
        raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')
    gold = _gold(targets, labels)
    known = set(labels)
    pred = [p.strip().upper() if p.strip().upper() in known else labels[0] for p in predictions]
    return label_f1(gold, pred)


def fever_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    return accuracy(targets, predictions, FEVER_LABELS)


def multipit_id_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    return accuracy(targets, predictions, MULTIPIT_ID_LABELS)


def stance_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    return classification_f1(targets, predictions, STANCE_LABELS)
