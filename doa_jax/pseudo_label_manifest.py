"""What a pseudo-label directory holds: `.manifest.json` and the chunk markers.

The manifest records the directory's *identity* (the teacher's fingerprint, the task, split and
decode settings) and the chunk *layouts* it was written with. A rerun with another identity is
refused, naming the difference, unless it asks to overwrite. A rerun with another layout (another
CHUNK_SIZE, LIMIT or host count) resumes: it keeps every labeled example and labels only the
missing ones.

Each layout (num_shards, chunk_size, pool_size) is a *generation*, numbered by its place in the
manifest; its chunks are named `chunk-SSSSS-CCCCC.jsonl` (generation 0, the names older versions
wrote) or `chunk-SSSSS-CCCCC-gG.jsonl`, so chunks of two layouts never share a name. Each chunk's
marker records the pool indices and the id range it holds. The manifest starts with '.', so the
pseudo-labeled task's reader (which globs the directory) never reads it as a chunk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

from doa_jax import run_identity

log = logging.getLogger(__name__)

MANIFEST = '.manifest.json'
MARKER = '.COMPLETED'
_CHUNK_RE = re.compile(r'^chunk-(\d+)-(\d+)(?:-g(\d+))?\.jsonl$')


class PseudoLabelError(ValueError):
    """A pool or output directory that cannot give exactly-once pseudo-labels."""


class IdentityMismatchError(PseudoLabelError, run_identity.RunConfigError):
    """The directory holds labels of another teacher, task or decode settings."""


@dataclasses.dataclass
class Plan:
    """Where this shard's labeling resumes: the layout's generation and the pool indices that
    completed chunks of any generation already hold."""

    generation: int
    done: set[int]
    legacy: bool = False


def chunk_name(shard_id: int, chunk_id: int, generation: int = 0) -> str:
    suffix = f'-g{generation}' if generation else ''
    return f'chunk-{shard_id:05d}-{chunk_id:05d}{suffix}.jsonl'


def parse_chunk_name(name: str) -> tuple[int, int, int] | None:
    """(shard, chunk, generation) of a chunk file name, or None."""
    m = _CHUNK_RE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def marker_record(records: list[dict[str, Any]], *, shard_id: int, chunk_id: int,
                  generation: int) -> dict[str, Any]:
    """What a chunk's marker says: its size, place, pool indices and id range."""
    return {'count': len(records), 'shard': shard_id, 'chunk': chunk_id,
            'generation': generation, 'indices': [int(r['index']) for r in records],
            'first_id': str(records[0]['id']) if records else None,
            'last_id': str(records[-1]['id']) if records else None}


def chunk_files(output_dir: str) -> list[str]:
    """Names of every chunk file (completed or not) in the directory, sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if parse_chunk_name(n) is not None)


def _completed(output_dir: str) -> list[str]:
    return [n for n in chunk_files(output_dir)
            if os.path.exists(os.path.join(output_dir, n + MARKER))]


def _indices(output_dir: str, name: str) -> list[int]:
    """Pool indices of a completed chunk: from its marker, else (older markers) its records."""
    path = os.path.join(output_dir, name)
    try:
        with open(path + MARKER, encoding='utf-8') as f:
            marker = json.loads(f.read() or '{}')
    except ValueError:
        marker = {}
    if isinstance(marker, dict) and isinstance(marker.get('indices'), list):
        return [int(i) for i in marker['indices']]
    with open(path, encoding='utf-8') as f:
        return [int(json.loads(line)['index']) for line in f if line.strip()]


def _grid(layout: Mapping[str, int], shard_id: int, chunk_id: int) -> list[int]:
    """Pool indices of chunk `chunk_id` of shard `shard_id` under `layout`."""
    n, size, total = layout['num_shards'], layout['chunk_size'], layout['pool_size']
    mine = range(shard_id, total, n)
    return list(mine[chunk_id * size:(chunk_id + 1) * size])


def check(output_dir: str, identity: Mapping[str, Any] | None, overwrite: bool = False) -> None:
    """Refuses (IdentityMismatchError) a directory whose manifest records another identity; only the
    keys both know are compared. Read-only: every host runs it before any writes."""
    if overwrite or identity is None:
        return
    manifest = run_identity.read_json(os.path.join(output_dir, MANIFEST))
    recorded = (manifest or {}).get('identity')
    if not isinstance(recorded, Mapping):
        return
    diffs = run_identity.differences(recorded, identity, common_only=True)
    if diffs:
        listing = '\n  '.join(diffs)
        raise IdentityMismatchError(
                f'{output_dir} holds pseudo-labels made with other settings (recorded in '
                f'{os.path.join(output_dir, MANIFEST)}); adding to them would mix two teachers\' '
                f'labels:\n  {listing}\nWrite these labels to a new directory '
                f'(--gin.INFER_OUTPUT_DIR), or replace the old ones with --overwrite '
                f'(gin: OVERWRITE=True; the old labels are deleted).')


def _clear(output_dir: str) -> None:
    """Deletes every chunk, marker, the merge summary and the manifest (--overwrite)."""
    for name in chunk_files(output_dir):
        for path in (os.path.join(output_dir, name + MARKER), os.path.join(output_dir, name)):
            if os.path.exists(path):
                os.remove(path)
    for name in (MANIFEST, '.merge.json'):
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


def prepare(output_dir: str, identity: Mapping[str, Any] | None, layout: Mapping[str, int],
            shard_id: int, *, overwrite: bool = False, write: bool = True,
            info: Mapping[str, Any] | None = None) -> Plan:
    """Checks the directory's identity, records `layout` and returns this shard's Plan.

    `info` (e.g. the teacher checkpoint's path and the LIMIT) is recorded but not compared.
    `write` (one host) creates or updates the manifest, upgrades older markers and, with
    `overwrite`, first deletes everything the directory holds. Every host deletes its own chunk
    files that have no marker (killed mid-chunk): the pseudo-labeled task would read them.
    A directory written before manifests existed is adopted: its chunks cannot be checked against
    the teacher (a warning says so); their layout is recognised when it is `layout`."""
    os.makedirs(output_dir, exist_ok=True)
    if overwrite and write:
        _clear(output_dir)
    else:
        check(output_dir, identity)
    path = os.path.join(output_dir, MANIFEST)
    manifest = run_identity.read_json(path)
    completed = _completed(output_dir)
    changed = manifest is None
    if manifest is None:
        manifest = {'format': 1, 'layouts': [], 'legacy': bool(completed)}
        if completed:
            log.warning('%s holds %d chunks written before pseudo-label manifests existed; '
                        'adopting them as labels of this teacher and settings (they cannot be '
                        'checked).', output_dir, len(completed))
    if identity is not None and manifest.get('identity') is None:
        manifest['identity'], changed = run_identity.describe(dict(identity)), True
    layouts = manifest.setdefault('layouts', [])
    current = {k: int(layout[k]) for k in ('num_shards', 'chunk_size', 'pool_size')}
    if manifest.get('legacy') and not layouts:
        # Older chunks carry no layout: generation 0 is this layout only if they match its grid.
        fits = all(_indices(output_dir, n) == _grid(current, *parse_chunk_name(n)[:2])
                   for n in completed)
        layouts.append(current if fits else {'legacy': True})
        changed = True
    if current not in layouts:
        layouts.append(current)
        changed = True
    generation = layouts.index(current)
    done: set[int] = set()
    for name in completed:
        done.update(_indices(output_dir, name))
    for name in chunk_files(output_dir):   # this shard's chunks killed before their marker
        if parse_chunk_name(name)[0] == shard_id and name not in completed:
            os.remove(os.path.join(output_dir, name))
    if write:
        info = run_identity.describe(dict(info or {}))
        if changed or any(manifest.get(k) != v for k, v in info.items()):
            manifest.update(info)
            run_identity.write_json(path, manifest)
        _upgrade_markers(output_dir, completed)
    return Plan(generation, done, bool(manifest.get('legacy')))


def _upgrade_markers(output_dir: str, completed: list[str]) -> None:
    """Rewrites older `{'count'}` markers with their indices, so later runs need not read the
    chunks; the chunk itself is complete (it has a marker), so this changes no label."""
    from doa_jax.pseudo_label import _atomic_write
    for name in completed:
        path = os.path.join(output_dir, name)
        with open(path + MARKER, encoding='utf-8') as f:
            try:
                marker = json.loads(f.read() or '{}')
            except ValueError:
                marker = {}
        if isinstance(marker, dict) and 'indices' in marker:
            continue
        with open(path, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
        shard, chunk, generation = parse_chunk_name(name)
        _atomic_write(path + MARKER, json.dumps(marker_record(
                records, shard_id=shard, chunk_id=chunk, generation=generation)) + '\n')


def run_id(output_dir: str, ledger: Any, legacy: bool) -> str:
    """The ledger run id recorded in the manifest (chosen on first use; see
    `run_identity.folder_run_id`). A directory with chunks from before manifests adopts its name,
    which its ledger rows carry."""
    return run_identity.folder_run_id(output_dir, ledger, file=MANIFEST, adopt_name=legacy)
