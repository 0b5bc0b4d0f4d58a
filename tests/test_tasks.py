"""The seqio tasks: every paper task tokenizes, budget slices are nested and disjoint from the
pool, the pool withholds targets, user and pseudo-labeled tasks register from files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import seqio

import tasks
from doa_jax.data import jsonl, paper, vocabulary

LENGTHS = {'inputs': 64, 'targets': 32}
BYTE = seqio.ByteVocabulary()


@pytest.fixture(scope='module', autouse=True)
def byte_tasks(data_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv('DOA_DATA_DIR', str(data_dir))
    mp.delenv('DOA_TFDS_DIR', raising=False)   # the JSONL files unless a test prepares records
    tasks.register_paper_tasks(vocabulary=BYTE, overwrite=True)
    yield
    mp.undo()


def _examples(name, split='train', n=None, lengths=LENGTHS):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False)
    return list((ds.take(n) if n else ds).as_numpy_iterator())


@pytest.mark.parametrize('dataset', sorted(paper.DATASETS))
def test_every_paper_task_yields_tokenized_examples(dataset):
    spec = paper.DATASETS[dataset]
    for ex in _examples(f'doa_{dataset}', 'test', 3, {'inputs': 1024, 'targets': 1024}):
        assert ex['inputs_pretokenized'].decode().startswith(spec.prefix)
        assert ex['inputs'].dtype == np.int32 and ex['inputs'][-1] == 1  # EOS appended.
        assert BYTE.decode(ex['inputs'][:-1].tolist()) == ex['inputs_pretokenized'].decode()
        assert BYTE.decode(ex['targets'][:-1].tolist()) == ex['targets_pretokenized'].decode()


def test_prefixes_follow_the_paper():
    assert {d: s.prefix for d, s in paper.DATASETS.items()} == {
            'wlp': 'wlp: ', 'stanceosaurus': 'stanceosaurus: ', 'fever': 'fever: ',
            'multipit_id': 'multipit_id: ', 'multipit_gen': 'multipit: ', 'nq': 'nq: '}


def test_missing_train_file_says_how_to_fix():
    with pytest.raises(FileNotFoundError, match='fever_train_all.json: no such data file.*download'):
        _examples('doa_fever', 'train', 1)


def test_sentencepiece_vocabulary_trained_on_real_data(tmp_path, data_dir):
    import sentencepiece as spm
    rows = [json.loads(l) for l in open(data_dir / 'wlp/wlp_train_all.json')][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(r['source'] for r in rows),
                                   model_prefix=str(tmp_path / 'sp'), vocab_size=400,
                                   character_coverage=1.0, model_type='unigram', pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, num_threads=1)
    vocabulary.set_default_vocabulary(str(tmp_path / 'sp.model'))
    try:
        vocab = vocabulary.default_vocabulary()
        name = tasks.register_jsonl_task(
                'test_wlp_sp', {'test': str(data_dir / 'wlp/wlp_test_all.json')}, 'wlp: ',
                allow_empty_target=True, overwrite=True).name
    finally:
        vocabulary.set_default_vocabulary(None)
    assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.vocab_size == 500
    ex = _examples(name, 'test', 1, {'inputs': 256, 'targets': 256})[0]
    assert vocab.decode(ex['inputs'].tolist()) == ex['inputs_pretokenized'].decode()


def test_vocabulary_env_override(monkeypatch):
    monkeypatch.setenv('DOA_VOCAB', 'byte')
    assert isinstance(vocabulary.default_vocabulary(), seqio.ByteVocabulary)
    monkeypatch.delenv('DOA_VOCAB')
    # The T5 default loads lazily: no file is read to build it.
    assert vocabulary.default_vocabulary().sentencepiece_model_file == vocabulary.T5_SPM_PATH


def test_wlp_budget_slices_nested_and_pool_disjoint_without_targets(data_dir):
    raw = lambda name: list(seqio.get_mixture_or_task(name).source
                            .get_dataset('train', shuffle=False).as_numpy_iterator())
    small, large, pool = (raw('doa_wlp_labeled_1000'), raw('doa_wlp_labeled_5000'),
                          raw('doa_wlp_unlabeled'))
    assert (len(small), len(large), len(pool)) == (1000, 5000, 14271 - 5000)
    ids = lambda exs: [e['id'] for e in exs]
    assert ids(large)[:1000] == ids(small)  # Nested prefixes of one shuffled order.
    assert not set(ids(large)) & set(ids(pool))
    assert len(set(ids(large)) | set(ids(pool))) == 14271
    # The pool's source never carries the gold targets, and its preprocessor empties them too.
    assert {e['targets'] for e in pool} == {b''}
    assert all(e['targets_pretokenized'] == b'' and e['targets'].tolist() == [1]
               for e in _examples('doa_wlp_unlabeled', n=200))
    assert ids(raw('doa_wlp_labeled_1000')) == ids(small)  # Deterministic.
    gold = {f'wlp_train_all.json:{i}': json.loads(l)['target']
            for i, l in enumerate(open(data_dir / 'wlp/wlp_train_all.json'), 1)}
    assert all(gold[e['id'].decode()] == e['targets'].decode() for e in small)


def test_budget_tasks_on_a_split_file_and_seed(data_dir):
    files = {'train': str(data_dir / 'fever/fever_dev_all.json'),
             'test': str(data_dir / 'nq/nq_dev_all.json')}
    names = tasks.register_budget_tasks('test_fever', files, 'fever: ', (100, 400), seed=3,
                                        pool_size=50, vocabulary=BYTE, overwrite=True)
    assert names == ['test_fever_labeled_100', 'test_fever_labeled_400', 'test_fever_unlabeled']
    a, b = _examples(names[0]), _examples(names[1])
    assert [e['id'] for e in b[:100]] == [e['id'] for e in a]
    assert len(_examples(names[2])) == 50
    # A seqio shuffle seed reorders the slice but never changes its content.
    shuffled = seqio.get_mixture_or_task(names[0]).get_dataset(LENGTHS, 'train', shuffle=True, seed=7)
    assert sorted(e['id'] for e in shuffled.as_numpy_iterator()) == sorted(e['id'] for e in a)
    tasks.register_budget_tasks('test_fever_s4', files, 'fever: ', (100,), seed=4,
                                vocabulary=BYTE, overwrite=True)
    assert [e['id'] for e in _examples('test_fever_s4_labeled_100')] != [e['id'] for e in a]
    with pytest.raises(ValueError, match='already registered'):
        tasks.register_budget_tasks('test_fever', files, 'fever: ', (100,))


def test_jsonl_factory_user_task(tmp_path):
    path = tmp_path / 'mine.jsonl'
    path.write_text('\n'.join(json.dumps({'q': f'q{i}', 'a': f'a{i}'}) for i in range(5)) + '\n')
    from doa_jax.metrics import squad
    task = tasks.register_jsonl_task('test_user', {'train': str(path), 'validation': str(path)},
                                     'mine: ', [squad], fields=('q', 'a'), vocabulary=BYTE,
                                     overwrite=True)
    exs = _examples('test_user', 'validation')
    assert [e['inputs_pretokenized'] for e in exs] == [f'mine: q{i}'.encode() for i in range(5)]
    assert task.metric_fns == [squad]


def test_pseudo_labeled_task_from_inference_shards(tmp_path):
    pool = _examples('doa_wlp_unlabeled', n=6)
    out = tmp_path / 'infer'
    out.mkdir()
    for shard in range(2):
        lines = [json.dumps({'id': e['id'].decode(), 'input': e['inputs_pretokenized'].decode(),
                             'prediction': f'pseudo {shard}-{i} [Reagent]' if i else ''})
                 for i, e in enumerate(pool[3 * shard:3 * shard + 3])]
        (out / f'shard-{shard:05d}-of-00002.jsonl').write_text('\n'.join(lines) + '\n')
    (out / 'shard-00000-of-00002.jsonl.COMPLETED').write_text('')
    task = tasks.register_pseudo_labeled_task('test_pseudo', str(out), prefix='wlp: ',
                                              eval_task='doa_wlp', vocabulary=BYTE,
                                              overwrite=True)
    exs = _examples('test_pseudo')
    assert [e['id'] for e in exs] == [e['id'] for e in pool]
    assert exs[4]['targets_pretokenized'] == b'pseudo 1-1 [Reagent]'
    assert exs[3]['targets_pretokenized'] == b''  # Empty predictions are kept, not dropped.
    assert exs[0]['inputs_pretokenized'] == pool[0]['inputs_pretokenized']  # Not prefixed twice.
    assert 'test' in task.splits and task.metric_fns == seqio.get_mixture_or_task('doa_wlp').metric_fns
    assert len(_examples('test_pseudo', 'test', 2)) == 2
    tasks.register_pseudo_labeled_task('test_pseudo_done', str(out), completed_only=True,
                                       vocabulary=BYTE, overwrite=True)
    assert len(_examples('test_pseudo_done')) == 3

    (out / 'shard-00001-of-00002.jsonl').write_text(json.dumps({'input': 'x', 'prediction': 'y'}))
    with pytest.raises(jsonl.DataError, match=r'shard-00001-of-00002.jsonl:1: missing field "id"'):
        tasks.read_pseudo_labels(str(out))
    with pytest.raises(FileNotFoundError, match='no inference shards'):
        tasks.read_pseudo_labels(str(tmp_path))


def test_seqio_evaluator_scores_with_the_task_metric(tmp_path, data_dir):
    """The metric functions plug into seqio's Evaluator: half-wrong predictions give 50 accuracy."""
    lines = (data_dir / 'fever/fever_dev_all.json').read_text().splitlines()[:20]
    path = tmp_path / 'fever20.json'
    path.write_text('\n'.join(lines) + '\n')
    from doa_jax import metrics
    tasks.register_jsonl_task('test_fever20', {'validation': str(path)}, 'fever: ',
                              [metrics.fever_accuracy], labels=metrics.FEVER_LABELS,
                              vocabulary=BYTE, overwrite=True)
    evaluator = seqio.Evaluator('test_fever20', seqio.EncDecFeatureConverter(pack=False),
                                sequence_length={'inputs': 128, 'targets': 16},
                                async_compute_metrics=False)

    def predict_fn(ds):
        out = []
        for i, ex in ds.as_numpy_iterator():  # seqio passes (index, features) pairs.
            tokens = ex['decoder_target_tokens'].tolist()
            wrong = BYTE.encode('NOT A LABEL') + [1]
            out.append((i, tokens if i % 2 else wrong + [0] * (len(tokens) - len(wrong))))
        return out

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
    result = all_metrics.result()['test_fever20']
    # Every even row is unparseable: wrong when strict; the paper's scoring maps it to class 0
    # (REFUTES), right for the 6 of those 10 rows whose gold label is REFUTES.
    assert result['accuracy_strict'] == pytest.approx(50.0)
    assert result['accuracy'] == pytest.approx(80.0)


# Prepared TFDS records (python -m doa_jax.data prepare) against the JSONL files they came from.

UNCACHED = 'Using an uncached FunctionDataset for training'
# One of each kind: a whole train split, an evaluation split, budget slices, the pool.
WLP_SPLITS = [('doa_wlp', 'train'), ('doa_wlp_labeled_1000', 'test'),
              ('doa_wlp_labeled_1000', 'train'), ('doa_wlp_labeled_5000', 'train'),
              ('doa_wlp_unlabeled', 'train')]


@pytest.fixture(scope='module')
def prepared_wlp(data_dir, tmp_path_factory):
    """WLP's TFDS records, prepared once into a temporary folder."""
    from doa_jax.data.__main__ import main
    root = tmp_path_factory.mktemp('tfds')
    assert main(['prepare', '--tasks=wlp', f'--data_dir={data_dir}', f'--tfds_dir={root}']) == 0
    return root


def _raw(name, split):
    return list(seqio.get_mixture_or_task(name).source.get_dataset(split, shuffle=False)
                .as_numpy_iterator())


def _rows(name, split):
    """(id, inputs, targets) of a task split's source, read in batches (fast)."""
    ds = seqio.get_mixture_or_task(name).source.get_dataset(split, shuffle=False).batch(4096)
    return [row for b in ds.as_numpy_iterator()
            for row in zip(b['id'].tolist(), b['inputs'].tolist(), b['targets'].tolist())]


def test_prepared_records_give_the_jsonl_examples(prepared_wlp, tmp_path, monkeypatch):
    """Every kind of WLP task split, the budget slices and the pool included: the same ids,
    inputs and targets from the TFDS records as from the JSONL files, in the same order (the
    full train split, which no slice takes part of, is stored in the budget order)."""
    monkeypatch.setenv('DOA_TFDS_DIR', str(tmp_path))            # nothing prepared there
    jsonl = {key: _rows(*key) for key in WLP_SPLITS}
    assert not any(seqio.get_mixture_or_task(n).source.tfds_source(s) for n, s in WLP_SPLITS)
    monkeypatch.setenv('DOA_TFDS_DIR', str(prepared_wlp))
    for name, split in WLP_SPLITS:
        assert seqio.get_mixture_or_task(name).source.tfds_source(split) is not None, name
        got, want = _rows(name, split), jsonl[name, split]
        if (name, split) == ('doa_wlp', 'train'):
            got, want = sorted(got), sorted(want)
        assert got == want, (name, split)
    assert [len(jsonl[k]) for k in WLP_SPLITS] == [14271, 3562, 1000, 5000, 9271]
    assert {row[2] for row in jsonl['doa_wlp_unlabeled', 'train']} == {b''}


def test_training_reads_of_both_paths_agree_and_warn_nothing(prepared_wlp, tmp_path,
                                                             monkeypatch, caplog):
    """A training read (shuffled by a seed, sharded) of a budget slice gives the same examples in
    the same order from the JSONL files as from the prepared records, and seqio warns about
    neither; two hosts split them between them."""
    task = seqio.get_mixture_or_task('doa_wlp_labeled_1000')

    def ids(shard=None):
        ds = task.get_dataset(LENGTHS, split='train', shuffle=True, seed=5, shard_info=shard)
        return [e['id'] for e in ds.as_numpy_iterator()]

    monkeypatch.setenv('DOA_TFDS_DIR', str(tmp_path))
    with caplog.at_level('WARNING'):
        fallback = ids()
    monkeypatch.setenv('DOA_TFDS_DIR', str(prepared_wlp))
    with caplog.at_level('WARNING'):
        prepared = ids()
    assert UNCACHED not in caplog.text
    assert prepared == fallback and len(set(prepared)) == 1000
    # Two hosts read disjoint halves of the slice.
    halves = [ids(seqio.ShardInfo(index=i, num_shards=2)) for i in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(prepared) and len(halves[0]) == 500


def test_prepared_records_without_files_stale_files_and_other_seeds(prepared_wlp, data_dir,
                                                                    tmp_path, monkeypatch):
    """Records serve when the JSONL files are gone; a file changed since prepare is an error
    that says how to fix it; slices with another seed read the JSONL files; a slice too large for
    the records fails as it does on the JSONL path."""
    monkeypatch.setenv('DOA_TFDS_DIR', str(prepared_wlp))
    monkeypatch.setenv('DOA_DATA_DIR', str(tmp_path))               # no JSONL file there
    assert len(_raw('doa_wlp_labeled_1000', 'train')) == 1000
    (tmp_path / 'wlp').mkdir()
    lines = (data_dir / 'wlp/wlp_test_all.json').read_text().splitlines(keepends=True)
    (tmp_path / 'wlp/wlp_test_all.json').write_text(''.join(lines[:-1]))
    with pytest.raises(jsonl.DataError, match=r"'test' records were prepared from a 866585-byte "
                                              r'wlp_test_all.json.*Prepare again'):
        _raw('doa_wlp', 'test')

    monkeypatch.setenv('DOA_DATA_DIR', str(data_dir))
    spec = paper.DATASETS['wlp']
    files = {s: str(data_dir / rel) for s, rel in spec.files.items()}
    names = tasks.register_budget_tasks('test_wlp_seed3', files, spec.prefix, (1000,), seed=3,
                                        vocabulary=BYTE, allow_empty_target=True, overwrite=True,
                                        prepared='wlp')
    source = seqio.get_mixture_or_task(names[0]).source
    assert source.tfds_source('train') is None and source.tfds_source('test') is not None
    assert _raw(names[0], 'train')[0]['id'] != _raw('doa_wlp_labeled_1000', 'train')[0]['id']
    names = tasks.register_budget_tasks('test_wlp_big', files, spec.prefix, (14271,),
                                        vocabulary=BYTE, allow_empty_target=True, overwrite=True,
                                        prepared='wlp')
    source = lambda name: seqio.get_mixture_or_task(name).source
    assert source(names[0]).tfds_source('train') is not None     # all 14271: fits
    with pytest.raises(ValueError, match='test_wlp_big_unlabeled: the prepared train split has 14271'):
        source(names[1]).tfds_source('train')
    tasks.register_budget_tasks('test_wlp_huge', files, spec.prefix, (20000,), vocabulary=BYTE,
                                overwrite=True, prepared='wlp')
    with pytest.raises(ValueError, match='a labeled slice of 20000 needs 20000 examples'):
        source('test_wlp_huge_labeled_20000').tfds_source('train')
