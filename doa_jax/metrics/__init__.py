"""The paper's evaluation metrics, as seqio metric functions `fn(targets, predictions) -> dict`."""

from doa_jax.metrics.classification import (FEVER_LABELS, MULTIPIT_ID_LABELS, STANCE_LABELS,
                                            accuracy, classification_f1, fever_accuracy,
                                            multipit_id_accuracy, normalize_label, stance_f1)
from doa_jax.metrics.paraphrase import (PAPER_BERTSCORE_LAYERS, PAPER_BERTSCORE_MODEL, bert_ibleu,
                                        bertscore_f1, bertscore_settings_from_env,
                                        make_bert_ibleu, resolve_bertscore_model, self_bleu)
from doa_jax.metrics.squad import normalize_answer, squad
from doa_jax.metrics.wlp import WLP_LABELS, parse_entities, span_f1, wlp_metrics

__all__ = ['FEVER_LABELS', 'MULTIPIT_ID_LABELS', 'STANCE_LABELS', 'WLP_LABELS', 'PAPER_BERTSCORE_MODEL',
           'PAPER_BERTSCORE_LAYERS', 'accuracy', 'classification_f1', 'fever_accuracy',
           'multipit_id_accuracy', 'normalize_label', 'stance_f1', 'bert_ibleu', 'bertscore_f1',
           'bertscore_settings_from_env', 'make_bert_ibleu', 'resolve_bertscore_model', 'self_bleu',
           'normalize_answer', 'squad', 'parse_entities', 'span_f1', 'wlp_metrics']
