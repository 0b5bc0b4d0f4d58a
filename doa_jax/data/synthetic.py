"""A synthetic lab-protocol tagging task in the WLP output format, generated deterministically.

It is the embedded default of the study quickstart: no download, no SentencePiece model (byte
vocabulary), the same examples on every machine. A source is a short protocol step; its target
lists the entity strings in source order, each followed by its label, as WLP targets do:

    "Add 20 ul of lysis buffer to the tube."  ->  "Add [Action] 20 ul [Amount] lysis buffer
    [Reagent] tube [Location]"

Examples are drawn by a `random.Random` seeded with the split name and index, so a split of size n
is a prefix of the same split of any larger size.

`corpus` is the unlabeled text the quickstart's models are pretrained on (tasks/synthetic_corpus.py,
span corruption): sentences alone, no tags, drawn from splits of their own ('pretrain',
'pretrain_validation'), never from the study's 'train' (its labels and pool) or 'validation'.
The grammar is small, so the same sentence text can occur in several splits; what pretraining
never sees is a tag.
"""

from __future__ import annotations

import random
from typing import Callable

NAME = 'synthetic_wlp'
PREFIX_WORD = 'wlp'   # inputs read "wlp: <sentence>", as the paper's WLP runs do
LABELS = ('Action', 'Amount', 'Reagent', 'Location', 'Temperature', 'Time', 'Device')

_REAGENTS = ('PBS', 'ethanol', 'lysis buffer', 'water', 'glycerol', 'trypsin', 'medium',
             'primer mix', 'TE buffer', 'sample', 'supernatant', 'pellet')
_LOCATIONS = ('tube', 'plate', 'flask', 'column', 'dish', 'well', 'beaker')
_DEVICES = ('centrifuge', 'thermocycler', 'incubator', 'vortex mixer', 'water bath')
_TEMPERATURES = ('4 C', '37 C', '65 C', '95 C', 'room temperature', '-20 C')
_TIMES = ('30 s', '1 min', '5 min', '10 min', '30 min', '1 h', 'overnight')
_UNITS = ('ul', 'ml', 'mg', 'g')
_NUMBERS = ('1', '2', '5', '10', '20', '50', '100', '200', '0.5', '2.5')

Entity = tuple[str, str]   # (text, label)


def _amount(r: random.Random) -> str:
    return f'{r.choice(_NUMBERS)} {r.choice(_UNITS)}'


def _add(r: random.Random) -> list[str | Entity]:
    verb = r.choice(('Add', 'Transfer', 'Pipette'))
    return [(verb, 'Action'), ' ', (_amount(r), 'Amount'), ' of ', (r.choice(_REAGENTS), 'Reagent'),
            ' to the ', (r.choice(_LOCATIONS), 'Location'), '.']


def _incubate(r: random.Random) -> list[str | Entity]:
    return [('Incubate', 'Action'), ' the ', (r.choice(_LOCATIONS), 'Location'), ' at ',
            (r.choice(_TEMPERATURES), 'Temperature'), ' for ', (r.choice(_TIMES), 'Time'), '.']


def _spin(r: random.Random) -> list[str | Entity]:
    verb = r.choice(('Spin', 'Mix', 'Place'))
    return [(verb, 'Action'), ' the ', (r.choice(_REAGENTS), 'Reagent'), ' in the ',
            (r.choice(_DEVICES), 'Device'), ' for ', (r.choice(_TIMES), 'Time'), '.']


def _store(r: random.Random) -> list[str | Entity]:
    return [('Store', 'Action'), ' the ', (r.choice(_REAGENTS), 'Reagent'), ' at ',
            (r.choice(_TEMPERATURES), 'Temperature'), '.']


def _wash(r: random.Random) -> list[str | Entity]:
    return [('Wash', 'Action'), ' the ', (r.choice(_LOCATIONS), 'Location'), ' with ',
            (_amount(r), 'Amount'), ' ', (r.choice(_REAGENTS), 'Reagent'), ' twice.']


_TEMPLATES: tuple[Callable[[random.Random], list], ...] = (_add, _incubate, _spin, _store, _wash)


def example(split: str, index: int) -> dict[str, str]:
    """Example `index` of `split`: {'source': sentence, 'target': 'text [Label] ...'}."""
    r = random.Random(f'{NAME}/{split}/{index}')
    parts = r.choice(_TEMPLATES)(r)
    source = ''.join(p if isinstance(p, str) else p[0] for p in parts)
    target = ' '.join(f'{p[0]} [{p[1]}]' for p in parts if not isinstance(p, str))
    return {'source': source, 'target': target}


def examples(split: str, n: int) -> list[dict[str, str]]:
    """The first n examples of a split ('train', 'validation', 'test', or any other name)."""
    if n < 0:
        raise ValueError(f'n must be >= 0, got {n}')
    return [example(split, i) for i in range(n)]


# The pretraining corpus: the corpus split name -> the generator's split it draws from.
CORPUS_SPLITS = {'train': 'pretrain', 'validation': 'pretrain_validation'}
# Bumped when the corpus's sentences change (cached pretrained checkpoints are keyed by it).
CORPUS_VERSION = 1


def corpus(split: str, n: int) -> list[str]:
    """The first n sentences of a pretraining corpus split ('train' or 'validation')."""
    if split not in CORPUS_SPLITS:
        raise ValueError(f'the corpus has splits {sorted(CORPUS_SPLITS)}, not {split!r}')
    return [e['source'] for e in examples(CORPUS_SPLITS[split], n)]
