"""MultiPIT_gen metrics: BERT-iBLEU (beta 4) from BERTScore and selfBLEU against the source.

As in the paper: BERTScore F1 (idf weights from the sources) of each prediction against its source,
sentence BLEU (4-gram, 13a tokens, no smoothing) of each prediction against its source, both
shifted by 1e-5, combined per example as
    ((beta / bertscore + 1 / (1 - selfbleu)) / (beta + 1)) ** -1
and averaged. Empty predictions are scored as the text 'no prediction', as the paper did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu

PAPER_BERTSCORE_MODEL = 'microsoft/deberta-xlarge-mnli'
EPS = 1e-5


def self_bleu(predictions: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    """Per-example sentence BLEU in [0, 1] (no smoothing, all four orders, 13a tokens)."""
    bleu = sacrebleu.metrics.BLEU(tokenize='13a', smooth_method='none', effective_order=False)
    return np.array([bleu.sentence_score(p, [s]).score / 100.0
                     for p, s in zip(predictions, sources)], dtype=np.float64)


def bertscore_f1(predictions: Sequence[str], sources: Sequence[str], *,
                 model_type: str = PAPER_BERTSCORE_MODEL, num_layers: int | None = None,
                 idf: bool = True, batch_size: int = 64, device: str | None = None) -> np.ndarray:
    """Per-example BERTScore F1 (bert-score package); model_type may be a local path."""
    import bert_score  # Heavy (torch); imported only when the metric runs.
    _, _, f1 = bert_score.score(list(predictions), list(sources), model_type=model_type,
                                num_layers=num_layers, idf=idf, batch_size=batch_size,
                                device=device or 'cpu', lang='en')
    return f1.double().numpy()


def bert_ibleu(targets: Sequence[str], predictions: Sequence[str], *,
               sources: Sequence[str] | None = None, beta: float = 4.0,
               model_type: str = PAPER_BERTSCORE_MODEL, num_layers: int | None = None,
               idf: bool = True) -> dict[str, float]:
    """BERT-iBLEU, BERTScore and selfBLEU in percent. `sources` defaults to the targets (the
    released MultiPIT_gen test targets equal the sources)."""
    sources = list(targets if sources is None else sources)
    if len(sources) != len(predictions):
        raise ValueError(f'{len(sources)} sources but {len(predictions)} predictions.')
    preds = [p if p.strip() else 'no prediction' for p in predictions]
    bs = bertscore_f1(preds, sources, model_type=model_type, num_layers=num_layers, idf=idf) + EPS
    sb = self_bleu(preds, sources) + EPS
    score = ((beta / bs + 1.0 / (1.0 - sb)) / (beta + 1.0)) ** -1
    return {'bert_ibleu': 100.0 * float(score.mean()), 'bert_score': 100.0 * float(bs.mean()),
            'self_bleu': 100.0 * float(sb.mean())}


def make_bert_ibleu(model_type: str = PAPER_BERTSCORE_MODEL, num_layers: int | None = None,
                    idf: bool = True, beta: float = 4.0):
    """A seqio metric_fn(targets, predictions) bound to a BERTScore model."""
    def metric_fn(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
        return bert_ibleu(targets, predictions, beta=beta, model_type=model_type,
                          num_layers=num_layers, idf=idf)
    metric_fn.__name__ = 'bert_ibleu'
    return metric_fn
