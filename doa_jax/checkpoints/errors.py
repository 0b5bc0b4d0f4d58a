"""Errors raised when a checkpoint does not fit the model config."""

from __future__ import annotations

from typing import Sequence

_SHOW = 10


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter names or shapes do not match the model config."""

    @classmethod
    def build(cls, source: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
              bad_shapes: Sequence[tuple[str, tuple, tuple]] = (),
              hint: str = '') -> 'CheckpointMismatchError':
        lines = [f'{source} does not match the model config:']
        if bad_shapes:
            lines.append(f'  {len(bad_shapes)} shape mismatch(es) (checkpoint vs config):')
            lines += [f'    {p}: {a} vs {b}' for p, a, b in bad_shapes[:_SHOW]]
        if missing:
            lines.append(f'  {len(missing)} parameter(s) missing from the checkpoint, first: '
                         + ', '.join(missing[:_SHOW]))
        if unexpected:
            lines.append(f'  {len(unexpected)} unexpected parameter(s) in the checkpoint, first: '
                         + ', '.join(unexpected[:_SHOW]))
        lines.append(hint or '  Check that the model gin config / --model name matches the '
                     'checkpoint (e.g. t5_1_1_small vs t5_small, scanned vs unscanned layers).')
        return cls('\n'.join(lines))
