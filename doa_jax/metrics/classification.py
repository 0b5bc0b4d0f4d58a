"""Label metrics for the classification tasks (scikit-learn), scored the way the paper scored them.

The paper's evaluation (`compute_metrics` in its run_t5.py) strips each prediction and target,
upper-cases it, and looks it up in the task's label-to-id table; a prediction that is not exactly a
label then (e.g. `maybe`, `no.`, an empty string) becomes class id 0. That fallback class is
REFUTES for FEVER, NO for MultiPIT_id and IRRELEVANT for Stanceosaurus, so an unparseable prediction
scores as correct whenever the gold label is that class. The headline keys (`accuracy`, `micro_f1`,
`macro_f1`, ...) reproduce that; the `*_strict` keys beside them count such a prediction as wrong.

Each label tuple lists the task's labels in the order of the paper's class ids: labels[0] is
class id 0, the fallback. A gold label outside the set is a data error and raises.
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn import metrics as skm

FEVER_LABELS = ('REFUTES', 'SUPPORTS')
MULTIPIT_ID_LABELS = ('NO', 'YES')
STANCE_LABELS = ('IRRELEVANT', 'SUPPORTING', 'REFUTING', 'DISCUSSING', 'QUERYING')


def normalize_label(text: str) -> str:
    """The paper's label matching: strip, then upper-case; nothing else (`no.` stays `NO.`)."""
    return text.strip().upper()


def _check_lengths(targets: Sequence[str], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions.')


def _gold(targets: Sequence[str], labels: Sequence[str]) -> list[str]:
    known = set(labels)
    out = []
    for i, t in enumerate(targets):
        label = normalize_label(t)
        if label not in known:
            raise ValueError(f'target #{i} is {t!r}, not one of {list(labels)}; the evaluation '
                             'split holds a label this metric does not know (wrong task or metric).')
        out.append(label)
    return out


def accuracy(targets: Sequence[str], predictions: Sequence[str],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """`accuracy` (the paper's: a prediction outside `labels` counts as labels[0]) and
    `accuracy_strict` (it counts as wrong), in percent. Without `labels` there is no label set
    and both are the stripped, case-insensitive exact match."""
    _check_lengths(targets, predictions)
    if not targets:
        return {'accuracy': 0.0, 'accuracy_strict': 0.0}
    pred = [normalize_label(p) for p in predictions]
    if not labels:
        gold = [normalize_label(t) for t in targets]
        score = 100.0 * sum(g == p for g, p in zip(gold, pred)) / len(gold)
        return {'accuracy': score, 'accuracy_strict': score}
    gold, known = _gold(targets, labels), set(labels)
    paper = [p if p in known else labels[0] for p in pred]
    n = len(gold)
    return {'accuracy': 100.0 * skm.accuracy_score(gold, paper),
            'accuracy_strict': 100.0 * sum(g == p for g, p in zip(gold, pred)) / n}


def label_f1(gold: Sequence[str], pred: Sequence[str],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """Micro and macro precision/recall/F1 in percent, over `labels` (default: those seen in gold
    or pred, as the paper's `evaluate` f1 did); a prediction outside `labels` counts for none."""
    out = {}
    for average in ('micro', 'macro'):
        p, r, f, _ = skm.precision_recall_fscore_support(
                gold, pred, labels=None if labels is None else list(labels), average=average,
                zero_division=0)
        out.update({f'{average}_precision': 100.0 * p, f'{average}_recall': 100.0 * r,
                    f'{average}_f1': 100.0 * f})
    return out


def classification_f1(targets: Sequence[str], predictions: Sequence[str],
                      labels: Sequence[str]) -> dict[str, float]:
    """The paper's micro/macro P/R/F1 (unknown predictions become labels[0]), plus
    `micro_f1_strict` and `macro_f1_strict`: an unknown prediction predicts no class, so it is a
    miss for its gold class and a false positive for none (averaged over the labels seen in gold
    or among the known predictions)."""
    _check_lengths(targets, predictions)
    gold, known = _gold(targets, labels), set(labels)
    pred = [normalize_label(p) for p in predictions]
    out = label_f1(gold, [p if p in known else labels[0] for p in pred])
    seen = sorted(set(gold) | {p for p in pred if p in known})
    strict = label_f1(gold, [p if p in known else '<unknown>' for p in pred], labels=seen)
    out.update({'micro_f1_strict': strict['micro_f1'], 'macro_f1_strict': strict['macro_f1']})
    return out


def fever_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """FEVER accuracy; unknown predictions are REFUTES (class id 0) in `accuracy`."""
    return accuracy(targets, predictions, FEVER_LABELS)


def multipit_id_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """MultiPIT_id accuracy; unknown predictions are NO (class id 0) in `accuracy`."""
    return accuracy(targets, predictions, MULTIPIT_ID_LABELS)


def stance_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Stanceosaurus F1; unknown predictions are IRRELEVANT (class id 0) in the paper's keys."""
    return classification_f1(targets, predictions, STANCE_LABELS)
