"""MultiPIT_gen metrics: BERT-iBLEU (beta 4) from BERTScore and selfBLEU against the source.

As in the paper: BERTScore F1 (idf weights from the sources) of each prediction against its source,
sentence BLEU (4-gram, 13a tokens, no smoothing) of each prediction against its source, both
shifted by 1e-5, combined per example as
    ((beta / bertscore + 1 / (1 - selfbleu)) / (beta + 1)) ** -1
and averaged. Predictions and sources are stripped, and an empty prediction is scored as the text
'no prediction', as the paper did.

The paper's BERTScore setting is microsoft/deberta-xlarge-mnli, layer 40 (bert-score's default for
it), idf on. `DOA_BERTSCORE_MODEL` (a hub name, or a directory holding a model saved with
save_pretrained) and `DOA_BERTSCORE_LAYERS` replace it for the paper tasks; BERTScore runs on the
CUDA device when torch sees one, else on the CPU. It needs the `bertscore` extra.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import sacrebleu

PAPER_BERTSCORE_MODEL = 'microsoft/deberta-xlarge-mnli'
PAPER_BERTSCORE_LAYERS = 40   # bert-score's default for the paper's model, which its code used
MODEL_ENV = 'DOA_BERTSCORE_MODEL'
LAYERS_ENV = 'DOA_BERTSCORE_LAYERS'
INSTALL_HINT = "pip install 'doa_jax[bertscore]'"
EPS = 1e-5

_TRUE = {'1', 'on', 'yes', 'true'}


def bertscore_settings_from_env() -> tuple[str, int | None]:
    """(model, layers) from DOA_BERTSCORE_MODEL / DOA_BERTSCORE_LAYERS, else the paper's model."""
    model = os.environ.get(MODEL_ENV, '').strip() or PAPER_BERTSCORE_MODEL
    layers = os.environ.get(LAYERS_ENV, '').strip()
    if layers and not (layers.isdigit() and int(layers) > 0):
        raise ValueError(f'{LAYERS_ENV}={layers!r} is not a positive integer; set it to the '
                         f'model layer BERTScore reads (e.g. {PAPER_BERTSCORE_LAYERS} for '
                         f'{PAPER_BERTSCORE_MODEL}) or unset it.')
    return model, int(layers) if layers else None


@dataclasses.dataclass(frozen=True)
class BertScoreModel:
    """A BERTScore model that can be loaded without the network: `path` is a local directory,
    or the hub name itself when it is not cached and the hub answered (bert-score downloads it)."""
    name: str
    path: str
    num_layers: int


def _import(module: str):
    """`module` (bert-score or one it brings), or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'BERT-iBLEU (MultiPIT_gen) needs the bert-score package and its '
                          f'dependencies, and {module!r} does not import ({e}); install the '
                          f'extra: {INSTALL_HINT}') from e


def _require_bert_score() -> None:
    """Fails at once, before any model look-up, when bert-score is not installed."""
    try:
        found = importlib.util.find_spec('bert_score') is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError('BERT-iBLEU (MultiPIT_gen) needs the bert-score package, which is not '
                          f'installed; install the extra: {INSTALL_HINT}')


def _hub_offline() -> bool:
    constants = _import('huggingface_hub.constants')
    return bool(constants.HF_HUB_OFFLINE) or any(
            os.environ.get(v, '').strip().lower() in _TRUE
            for v in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'))


def _how_to_fix(name: str) -> str:
    return (f'To fix: download it once where huggingface.co is reachable (`hf download {name}`, '
            'into the Hugging Face cache this machine reads, see HF_HOME), or copy a directory '
            'holding the model files (config.json, the weights, the tokenizer files, as '
            f'save_pretrained writes them) to this machine and set {MODEL_ENV}=/path/to/it and '
            f'{LAYERS_ENV}=<layer> ({PAPER_BERTSCORE_LAYERS} for a copy of '
            f'{PAPER_BERTSCORE_MODEL}, the paper\'s model).')


def _cached_snapshot(name: str) -> str | None:
    """The local snapshot directory of hub model `name`, if it holds a config and weights."""
    hub = _import('huggingface_hub')
    try:
        path = hub.snapshot_download(name, local_files_only=True)
    except Exception:   # not cached (LocalEntryNotFoundError) or not a valid repo id
        return None
    files = set(os.listdir(path))
    weights = any(f.endswith(('.bin', '.safetensors')) for f in files)
    return path if 'config.json' in files and weights else None


def _default_layers(name: str, what: str) -> int:
    if name == PAPER_BERTSCORE_MODEL:
        return PAPER_BERTSCORE_LAYERS
    model2layers = _import('bert_score.utils').model2layers
    if name not in model2layers:
        raise ValueError(f'BERTScore model {what} has no default layer in bert-score; set '
                         f'{LAYERS_ENV} (or num_layers) to the layer to read.')
    return model2layers[name]


def resolve_bertscore_model(model_type: str = PAPER_BERTSCORE_MODEL,
                            num_layers: int | None = None) -> BertScoreModel:
    """Finds `model_type` locally (a directory, or the Hugging Face cache) or asks the hub once
    whether it has it, so a missing model fails in a fraction of a second instead of after a
    minute of download retries. Entry points can call it before a long run to fail early."""
    what = f'{model_type!r} (BERT-iBLEU for MultiPIT_gen; {MODEL_ENV})'
    local = os.path.expanduser(model_type)
    if os.path.isdir(local):
        path = os.path.abspath(local)
        if not os.path.isfile(os.path.join(path, 'config.json')):
            raise FileNotFoundError(
                    f'BERTScore model {what} is a directory without config.json; {MODEL_ENV} must '
                    'name a directory holding a model saved with save_pretrained, or a Hugging '
                    'Face hub name. ' + _how_to_fix(PAPER_BERTSCORE_MODEL))
        if num_layers is None:
            raise ValueError(f'BERTScore model {what} is a local directory, so bert-score knows '
                             f'no default layer for it; set {LAYERS_ENV} (or num_layers), e.g. '
                             f'{PAPER_BERTSCORE_LAYERS} for a copy of {PAPER_BERTSCORE_MODEL}.')
        return BertScoreModel(path, path, num_layers)
    if model_type.startswith(('/', '.', '~')) or model_type.count('/') > 1 or '\\' in model_type:
        raise FileNotFoundError(f'BERTScore model {what} is neither an existing directory nor a '
                                'Hugging Face hub name (owner/name). '
                                + _how_to_fix(PAPER_BERTSCORE_MODEL))
    path = _cached_snapshot(model_type)
    if path is None:
        if _hub_offline():
            raise FileNotFoundError(
                    f'BERTScore model {what} is not in the local Hugging Face cache and the hub '
                    'is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set). '
                    + _how_to_fix(model_type))
        try:   # One request, no retries: "no network" and "no such model" both fail fast.
            _import('huggingface_hub').model_info(model_type, timeout=10)
        except Exception as e:
            raise FileNotFoundError(
                    f'BERTScore model {what} is not in the local Hugging Face cache and the hub '
                    f'did not provide it ({type(e).__name__}: {str(e)[:200]}). '
                    + _how_to_fix(model_type)) from e
        path = model_type   # bert-score downloads it into the cache
    layers = num_layers if num_layers is not None else _default_layers(model_type, what)
    return BertScoreModel(model_type, path, layers)


def model_tag(model_type: str, num_layers: int, idf: bool = True) -> str | None:
    """None for the paper's BERTScore setting, else the text that names the one used."""
    if model_type == PAPER_BERTSCORE_MODEL and num_layers == PAPER_BERTSCORE_LAYERS and idf:
        return None
    return f'model={model_type},layer={num_layers}' + ('' if idf else ',idf=off')


def self_bleu(predictions: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    """Per-example BLEU in [0, 1] (no smoothing, all four orders, 13a tokens), as the paper's
    `evaluate` bleu. Scored as one-sentence corpora: sacrebleu's sentence_score would compute the
    same number but warn on every call that effective_order is off, which the paper's BLEU is."""
    bleu = sacrebleu.metrics.BLEU(tokenize='13a', smooth_method='none', effective_order=False,
                                  force=True)
    return np.array([bleu.corpus_score([p], [[s]]).score / 100.0
                     for p, s in zip(predictions, sources)], dtype=np.float64)


def _default_device() -> str:
    torch = _import('torch')
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _bertscore_f1(predictions: Sequence[str], sources: Sequence[str], model: BertScoreModel,
                  idf: bool, batch_size: int, device: str | None) -> np.ndarray:
    bert_score = _import('bert_score')   # Heavy (torch): imported only when the metric runs.
    _, _, f1 = bert_score.score(list(predictions), list(sources), model_type=model.path,
                                num_layers=model.num_layers, idf=idf, batch_size=batch_size,
                                device=device or _default_device(), lang='en')
    return f1.double().cpu().numpy()


def bertscore_f1(predictions: Sequence[str], sources: Sequence[str], *,
                 model_type: str = PAPER_BERTSCORE_MODEL, num_layers: int | None = None,
                 idf: bool = True, batch_size: int = 64, device: str | None = None) -> np.ndarray:
    """Per-example BERTScore F1 (bert-score package) on `device`, default CUDA when available."""
    _require_bert_score()
    model = resolve_bertscore_model(model_type, num_layers)
    return _bertscore_f1(predictions, sources, model, idf, batch_size, device)


def bert_ibleu(targets: Sequence[str], predictions: Sequence[str], *,
               sources: Sequence[str] | None = None, beta: float = 4.0,
               model_type: str = PAPER_BERTSCORE_MODEL, num_layers: int | None = None,
               idf: bool = True, batch_size: int = 64,
               device: str | None = None) -> dict[str, float]:
    """BERT-iBLEU, BERTScore and selfBLEU in percent. `sources` defaults to the targets (the
    released MultiPIT_gen test targets equal the sources).

    With any BERTScore setting but the paper's (its model, layer 40, idf), the result also holds
    `bert_ibleu[model=<hub name or absolute path>,layer=<n>]` (plus `,idf=off`), equal to
    `bert_ibleu`: the key names what scored it, so the number is not taken for the paper's. It is
    a key rather than a string field because every metric value is a number (the trainer and
    TensorBoard log floats), and `bert_ibleu` stays so studies find their headline metric.
    """
    sources = [s.strip() for s in (targets if sources is None else sources)]
    if len(sources) != len(predictions):
        raise ValueError(f'{len(sources)} sources but {len(predictions)} predictions.')
    preds = [p.strip() or 'no prediction' for p in predictions]
    _require_bert_score()
    model = resolve_bertscore_model(model_type, num_layers)
    bs = _bertscore_f1(preds, sources, model, idf, batch_size, device) + EPS
    sb = self_bleu(preds, sources) + EPS
    score = 100.0 * float((((beta / bs + 1.0 / (1.0 - sb)) / (beta + 1.0)) ** -1).mean())
    out = {'bert_ibleu': score, 'bert_score': 100.0 * float(bs.mean()),
           'self_bleu': 100.0 * float(sb.mean())}
    tag = model_tag(model.name, model.num_layers, idf)
    if tag is not None:
        out[f'bert_ibleu[{tag}]'] = score
    return out


def make_bert_ibleu(model_type: str = PAPER_BERTSCORE_MODEL, num_layers: int | None = None,
                    idf: bool = True, beta: float = 4.0):
    """A seqio metric_fn(targets, predictions) bound to a BERTScore model."""
    def metric_fn(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
        return bert_ibleu(targets, predictions, beta=beta, model_type=model_type,
                          num_layers=num_layers, idf=idf)
    metric_fn.__name__ = 'bert_ibleu'
    return metric_fn
