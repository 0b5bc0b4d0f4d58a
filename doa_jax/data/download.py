"""Fetching the paper's released files with size + sha256 verification.

Files the paper repository serves publicly carry checksums recorded in `paper.CHECKSUMS`. Files
without a recorded checksum (the train files of five datasets are not in the public repository; a
user may point `url_base` at a mirror that has them) are fetched unverified and their size and sha256
are written to `<data_dir>/checksums.tsv` on first download; later downloads verify against it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterable

from tqdm import tqdm

from doa_jax.data import paper

CHECKSUMS_FILE = 'checksums.tsv'


class ChecksumError(ValueError):
    """A downloaded file whose size or sha256 differs from the recorded one."""


def sha256_of(path: str | os.PathLike) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _fetch_url(url: str, dest: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, 'wb') as f:
        shutil.copyfileobj(r, f)


def read_recorded(data_dir: pathlib.Path) -> dict[str, tuple[int, str]]:
    """The checksums recorded in the data dir on earlier first downloads."""
    path = data_dir / CHECKSUMS_FILE
    out = {}
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split('\t')
            if len(parts) != 3 or not parts[1].isdigit():
                raise ChecksumError(f'{path}:{number}: expected "<file>\\t<size>\\t<sha256>", got '
                                    f'{line!r}; fix or delete the line.')
            out[parts[0]] = (int(parts[1]), parts[2])
    return out


def files_for(datasets: Iterable[str]) -> list[str]:
    """The distinct data files (relative paths) of the named datasets; 'all' means all six."""
    names = list(datasets)
    if names == ['all']:
        names = list(paper.DATASETS)
    unknown = [n for n in names if n not in paper.DATASETS]
    if unknown:
        raise ValueError(f'--tasks names unknown datasets {unknown}; choose from '
                         f'{sorted(paper.DATASETS)} or all.')
    return sorted({rel for n in names for rel in paper.DATASETS[n].files.values()})


def download(datasets: Iterable[str], data_dir: str | os.PathLike, *,
             url_base: str = paper.REPO_URL, public_only: bool = True,
             fetch: Callable[[str, str], None] = _fetch_url) -> dict[str, str]:
    """Downloads missing files into data_dir, verifying checksums. Returns {file: status}."""
    data_dir = pathlib.Path(data_dir)
    recorded = {**read_recorded(data_dir), **paper.CHECKSUMS}
    status = {}
    for rel in tqdm(files_for(datasets), desc='download', unit='file'):
        dest = data_dir / rel
        expected = recorded.get(rel)
        if dest.exists():
            if expected and sha256_of(dest) != expected:
                raise ChecksumError(f'{dest}: size/sha256 differ from the recorded {expected}; '
                                    'delete the file and download again.')
            status[rel] = 'present'
            continue
        if expected is None and public_only and rel not in paper.CHECKSUMS:
            status[rel] = 'not public: place it in the data dir by hand'
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix='.part')
        os.close(fd)
        try:
            fetch(url_base + rel, tmp)
            got = sha256_of(tmp)
            if expected and got != expected:
                raise ChecksumError(f'{url_base + rel}: got size {got[0]} sha256 {got[1]}, expected '
                                    f'{expected[0]} {expected[1]}; the file changed upstream or the '
                                    'download broke. Retry, or check url_base.')
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if expected is None:
            with open(data_dir / CHECKSUMS_FILE, 'a') as f:
                f.write(f'{rel}\t{got[0]}\t{got[1]}\n')
            status[rel] = 'downloaded (unverified; checksum recorded)'
        else:
            status[rel] = 'downloaded (verified)'
    return status
