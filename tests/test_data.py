"""JSONL reading and validation, and the real files' line counts and label sets."""

from __future__ import annotations

import json

import pytest

from doa_jax.data import paper
from doa_jax.data.jsonl import DataError, read_jsonl

EXPECTED_LINES = {
    'wlp/wlp_train_all.json': 14271, 'wlp/wlp_test_all.json': 3562,
    'stanceosaurus/stanceosaurus_test_all.json': 4750, 'fever/fever_dev_all.json': 10444,
    'multipit_id/multipit_id_test_all.json': 11530, 'multipit/multipit_test_all.json': 6120,
    'nq/nq_dev_all.json': 2837,
}


@pytest.mark.parametrize('dataset', sorted(paper.DATASETS))
def test_real_files_counts_and_labels(data_dir, dataset):
    spec = paper.DATASETS[dataset]
    for split, rel in spec.files.items():
        path = paper.split_path(dataset, split, data_dir)
        if not path.exists():
            assert split == 'train' and dataset != 'wlp', f'{path} should be in the shared data'
            continue
        records, report = read_jsonl(str(path), labels=spec.labels,
                                     allow_empty=('target',) if spec.allow_empty_target else ())
        assert len(records) == EXPECTED_LINES[rel] and not report.skipped
        if spec.labels:
            assert {r['target'].upper() for r in records} == set(spec.labels)


def test_checksums_recorded_for_local_files(data_dir):
    import hashlib
    for rel, (size, sha) in paper.CHECKSUMS.items():
        data = (data_dir / rel).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha


def _write(tmp_path, lines):
    path = tmp_path / 'bad.json'
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


GOOD = json.dumps({'source': 'a claim', 'target': 'SUPPORTS'})


@pytest.mark.parametrize('line,problem', [
        ('{"source": "x", "target": ', 'malformed JSON'),
        (json.dumps({'source': 'x'}), "missing field 'target'"),
        (json.dumps({'text': 'x', 'target': 'SUPPORTS'}), "missing field 'source'"),
        (json.dumps({'source': '  ', 'target': 'SUPPORTS'}), "field 'source' is an empty string"),
        (json.dumps({'source': 'x', 'target': 'MAYBE'}), "unknown class label 'MAYBE'"),
        (json.dumps(['x', 'y']), 'expected a JSON object'),
])
def test_bad_line_names_file_line_and_problem(tmp_path, line, problem):
    path = _write(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError, match=f'{path}:2: {problem}'):
        read_jsonl(path, labels=paper.DATASETS['fever'].labels)


def test_skip_mode_counts_and_reports(tmp_path, caplog):
    path = _write(tmp_path, [GOOD, '{oops', json.dumps({'source': 'x', 'target': ''}), GOOD])
    records, report = read_jsonl(path, labels=('SUPPORTS', 'REFUTES'), on_error='skip')
    assert len(records) == 2 and report.kept == 2
    assert [n for n, _ in report.skipped] == [2, 3]
    assert 'skipped 2' in report.summary() and f'{path}:3: field' in report.summary()
    assert 'skipped 2' in caplog.text


def test_empty_target_allowed_only_when_asked(tmp_path):
    path = _write(tmp_path, [json.dumps({'source': 'Mix well.', 'target': ''})])
    with pytest.raises(DataError, match=':1: field .target. is an empty string'):
        read_jsonl(path)
    assert len(read_jsonl(path, allow_empty=('target',))[0]) == 1


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='DOA_DATA_DIR'):
        read_jsonl(str(tmp_path / 'nope.json'))


def test_download_verifies_checksums_offline(tmp_path, data_dir, capsys):
    from doa_jax.data import download
    from doa_jax.data.__main__ import main
    dest = tmp_path / 'data'
    url_base = data_dir.as_uri() + '/'  # A file:// mirror: no network.
    assert main(['download', '--tasks=nq', f'--data_dir={dest}', f'--url_base={url_base}']) == 0
    out = capsys.readouterr().out
    assert 'nq/nq_dev_all.json: downloaded (verified)' in out
    assert 'nq/nq_train_all.json: not public' in out
    assert (dest / 'nq/nq_dev_all.json').read_bytes() == (data_dir / 'nq/nq_dev_all.json').read_bytes()
    assert download.download(['nq'], dest, url_base=url_base)['nq/nq_dev_all.json'] == 'present'

    def corrupt(url, path):
        with open(path, 'wb') as f:
            f.write(b'{"source": "tampered", "target": "x"}\n')
    with pytest.raises(download.ChecksumError, match='fever_dev_all.json: got size 38'):
        download.download(['fever'], dest, fetch=corrupt)
    assert not list((dest / 'fever').iterdir())  # No partial or bad file left behind.


def test_unverified_file_records_checksum_then_verifies(tmp_path, data_dir):
    from doa_jax.data import download
    mirror, dest = tmp_path / 'mirror', tmp_path / 'data'
    (mirror / 'nq').mkdir(parents=True)
    (mirror / 'nq/nq_dev_all.json').write_bytes((data_dir / 'nq/nq_dev_all.json').read_bytes())
    (mirror / 'nq/nq_train_all.json').write_text('{"source": "q?", "target": "a"}\n')
    status = download.download(['nq'], dest, url_base=mirror.as_uri() + '/', public_only=False)
    assert status == {'nq/nq_dev_all.json': 'downloaded (verified)',
                      'nq/nq_train_all.json': 'downloaded (unverified; checksum recorded)'}
    recorded = download.read_recorded(dest)
    assert recorded['nq/nq_train_all.json'] == download.sha256_of(dest / 'nq/nq_train_all.json')
    (dest / 'nq/nq_train_all.json').write_text('{"source": "changed", "target": "a"}\n')
    with pytest.raises(download.ChecksumError, match='nq_train_all.json: size/sha256 differ'):
        download.download(['nq'], dest, url_base=mirror.as_uri() + '/', public_only=False)


def test_prepare_builds_tfds_records(tmp_path, data_dir, capsys):
    import tensorflow_datasets as tfds
    from doa_jax.data.__main__ import main
    tfds_dir = tmp_path / 'tfds'
    assert main(['prepare', '--tasks=nq', f'--data_dir={data_dir}', f'--tfds_dir={tfds_dir}']) == 0
    assert 'nq: test=2837, validation=2837' in capsys.readouterr().out
    from doa_jax.data.tfds_builder import DistillOrAnnotate
    ds = DistillOrAnnotate(config='nq', data_dir=str(tfds_dir)).as_dataset(split='test')
    first = next(iter(tfds.as_numpy(ds.take(1))))
    file_name, line = first['id'].decode().split(':')
    record = json.loads((data_dir / 'nq' / file_name).read_text().splitlines()[int(line) - 1])
    assert (first['source'].decode(), first['target'].decode()) == (record['source'], record['target'])
    with pytest.raises(Exception, match='none of .*fever_dev_all.json.* found'):
        main(['prepare', '--tasks=fever', f'--data_dir={tmp_path}', f'--tfds_dir={tfds_dir}'])
