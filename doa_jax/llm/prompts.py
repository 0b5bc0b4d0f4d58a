"""Few-shot prompts in the style of Wang et al. 2021 ("Want To Reduce Labeling Cost? GPT-3 Can
Help"): an instruction, k labeled examples as Input/Output pairs, then the input to label."""

from __future__ import annotations

import re
from typing import Sequence


def default_instruction(labels: Sequence[str] | None) -> str:
    """A task-agnostic instruction; pass --instruction for a task-specific one."""
    if labels:
        return ('Label each input with exactly one of these labels: ' + ', '.join(labels) +
                '. Answer with the label only.')
    return 'Write the output for each input, following the examples. Answer with the output only.'


def build_messages(instruction: str, shots: Sequence[tuple[str, str]], source: str
                   ) -> list[dict[str, str]]:
    """Chat messages: the instruction as the system turn, shots and the query as one user turn
    (completion-style few-shot works the same on chat and on plain seq2seq models)."""
    lines = []
    for x, y in shots:
        lines.append(f'Input: {x}\nOutput: {y}\n')
    lines.append(f'Input: {source}\nOutput:')
    return [{'role': 'system', 'content': instruction},
            {'role': 'user', 'content': '\n'.join(lines)}]


def correction_message(labels: Sequence[str] | None) -> str:
    """The user turn that re-asks after an unparseable answer (it changes the request, so a
    deterministic model can answer differently)."""
    if labels:
        return ('That answer is not one of the labels. Answer with exactly one of: ' +
                ', '.join(labels) + '.')
    return 'That answer was empty. Write the output for the input, and only the output.'


def _norm(text: str) -> str:
    return re.sub(r'\s+', ' ', text.strip().strip('."\'`*').strip()).lower()


def parse_output(text: str, labels: Sequence[str] | None) -> tuple[str, bool]:
    """(prediction, valid). Classification: the label the output names (case-insensitive, exact
    or as its first words); generation: the stripped text, valid when non-empty."""
    text = text.split('\nInput:')[0].strip()
    if not labels:
        return text, bool(text)
    norm = _norm(text.splitlines()[0] if text else '')
    by_norm = {_norm(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm], True
    # The longest label the answer starts with ("SUPPORTS, because ..." -> SUPPORTS).
    for key in sorted(by_norm, key=len, reverse=True):
        if key and re.match(re.escape(key) + r'\b', norm):
            return by_norm[key], True
    return text, False
