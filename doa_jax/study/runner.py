"""Runs a distill-or-annotate study: every (strategy, N, budget) point through train/infer, priced.

Strategies (as the paper ran them):
  annotate   the student trains on N + B/$label gold labels;
  distill    the teacher fine-tunes on N labels, pseudo-labels as much of the unlabeled pool as
             the rest of B buys, and the student trains on those pseudo-labels;
  mixed:F    a fraction F of B buys gold labels; the teacher fine-tunes on N + those, the rest of
             B pays for pseudo-labels, and the student trains on gold + pseudo-labels;
  llm        an LLM (any OpenAI-compatible Chat Completions API, few-shot from the N gold
             labels) labels as much of the pool as B buys at its $/token; the student trains on
             the LLM's labels;
  human+llm  the same, with the student trained on the N gold labels plus the LLM's labels.

Where the money goes: labels x $/label; the teacher's fine-tuning and the pseudo-labeling at
the study's compute cost model (`doa_jax.cost.cost_model`): by default their FLOPs at a stated
nominal throughput, so that machine load and speed change neither the costs nor the answer; or,
with `ComputeCostModel(kind='measured')`, the wall-clock device-hours of the cost ledgers every run
writes either way. The student's own training is recorded (`usd_student`) and, as in the paper,
left out of the total unless `count_student_compute=True`. A stage killed and rerun costs its
work only: measured costs leave out what the crash added (the steps redone, the killed attempt's
compile and host time), which each record reports apart (`usd_crash_overhead_measured`).

Where the models start: a stage's `initial_checkpoint_path`, or, with `StageConfig.pretraining`,
its model pretrained by `python -m doa_jax.train` before the study and cached
(`doa_jax.study.pretrained`): as in the paper, pretraining is a sunk cost that no point pays. Each
point's record names the checkpoints its models started from.

Training follows the paper's rule: every model trains for a number of epochs over its own data
(`StageConfig.epochs`; the paper: teacher 20, student 50), clipped to the optional
[min_steps, max_steps] a config states. An epoch is the rows the trainer makes of the data: its
examples, or with `StageConfig.pack` the packed rows its feature converter makes of them
(`train_rows`). Each stage trains with the feature lengths a run on its task would take
(`stage_lengths`): the stage's own, else the study's TASK_FEATURE_LENGTHS, else those measured
for the task's data and vocabulary, else DEFAULT_FEATURE_LENGTHS.

Layout of STUDY_DIR:
  study.json                 the study's settings (a rerun must match them)
  data/eval.jsonl            the evaluation set
  teachers/M<m>_<model>/     a teacher fine-tuned on the first m gold labels (shared by points),
      train.jsonl, cost_ledger.sqlite, checkpoints/, pool.jsonl, pseudo_labels/chunk-*.jsonl
  points/<point_id>/         train.jsonl (the student's data), student/ (run dir), eval.json
  results.json, results.csv  one record per finished point (a rerun skips them)
  report.md, cost_metric.png, budget_bars.png
One pseudo-labeling run per teacher serves every budget: chunks are priced one by one, so a point
with budget B uses the longest prefix of chunks that B pays for (and labels no further).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Mapping, Sequence

from doa_jax.cost.cost_model import ComputeCostModel
from doa_jax.cost.prices import PriceTable, format_usd, load_prices
from doa_jax.data import lengths as feature_lengths
from doa_jax.study import data as data_lib
from doa_jax.study import pretrained
from doa_jax.study.data import StudyData
from doa_jax.study.pretrained import Pretraining
from doa_jax.study.results import atomic_write, load_results, run_points

log = logging.getLogger(__name__)

STRATEGY_HELP = ("'annotate', 'distill', 'mixed:F' (F in (0, 1): the share of B spent on "
                 "labels), 'llm' or 'human+llm'")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """How the study trains one model (the teacher or the student), in the run configs' words.

    Each field is the run-file macro of the same name in lower case, with the same meaning
    (gin_configs/runs/finetune.gin: BATCH_SIZE -> batch_size, NUM_MICROBATCHES ->
    num_microbatches, PACK -> pack, TASK_FEATURE_LENGTHS -> task_feature_lengths, MESH_MODEL ->
    mesh_model, ...), or the model's setting of the same name (get_model_config.remat_policy ->
    remat_policy, .scan_layers, .attention_impl, .matmul_impl), and reaches `trainer.train` and
    the model config as a run's does (`train_kwargs`, `model_config`): a stage and a runs/*.gin
    run with the same settings train identically (tests/test_study_runner.py checks the two
    against each other).

    Study-only: `model` (a run includes gin_configs/models/<model>.gin), and the paper's rule in
    place of TRAIN_STEPS: every model trains for `epochs` over its own data, steps =
    ceil(epochs x rows / batch_size) clipped to [min_steps, max_steps] (max_steps None: no
    cap), where rows are what one pass over the data makes: its examples, or with `pack` the
    packed rows the trainer's own feature converter makes of them at the stage's lengths and
    the study's seed (`train_rows`, `train_data.epoch_rows`), so that packed or not a stage
    trains the epochs it states. `task_feature_lengths=None` takes the study's
    TASK_FEATURE_LENGTHS, and when that is None too the lengths measured for the stage's task
    and vocabulary, else the study's DEFAULT_FEATURE_LENGTHS, as a run's TASK_FEATURE_LENGTHS =
    None does (`stage_lengths`). The study keeps one checkpoint per run and evaluates once after
    training (no EVAL_PERIOD). `pretraining` (a `pretrained.Pretraining` with steps > 0) starts
    the stage from its model pretrained by `python -m doa_jax.train` before the study, cached and
    never charged: the study sets `initial_checkpoint_path` to it (the two are not set together).

    The defaults are finetune.gin's, except `pack`: False, trainer.train's default and what a
    study.json written before the field existed ran with; the GPU study files set it (PACK)."""

    model: str = 't5_1_1_small'
    epochs: float = 50.0
    batch_size: int = 32
    learning_rate: float = 3e-5
    optimizer: str = 'adamw'
    schedule: str = 'constant'
    warmup_steps: int = 0
    activation_dtype: str = 'bfloat16'
    dropout_rate: float = 0.1
    z_loss: float = 1e-4
    min_steps: int = 1
    max_steps: int | None = None
    initial_checkpoint_path: str | None = None
    pretraining: Pretraining | None = None
    mesh_data: int = -1
    mesh_model: int = 1
    fsdp: bool = False
    log_period: int = 100
    checkpoint_period: int = 1000
    # What fits a model on its devices: remat, scanned layers, gradient accumulation.
    remat_policy: str | None = None
    scan_layers: bool = False
    num_microbatches: int = 1
    # The data: per-stage lengths (None: the study's), packing, what to do with longer examples.
    task_feature_lengths: Mapping[str, int] | None = None
    pack: bool = False
    overlong: str = 'truncate'
    # The loss.
    label_smoothing: float = 0.0
    loss_normalizing_factor: float | str | None = None
    # The op backends ('auto': per platform; doa_jax.ops).
    attention_impl: str = 'auto'
    matmul_impl: str = 'auto'

    def steps(self, rows: int) -> int:
        """Steps for `epochs` passes over `rows` training rows per pass (`train_rows`: the
        examples, or with `pack` the packed rows)."""
        steps = max(self.min_steps, math.ceil(self.epochs * rows / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps

    def lengths(self, study_lengths: Mapping[str, int] | None) -> dict[str, int]:
        """The feature lengths this stage trains (and its model decodes) with, given the study's
        (resolved: `stage_lengths` resolves them for a task)."""
        lengths = self.task_feature_lengths or study_lengths
        if lengths is None:
            raise ValueError('StageConfig.lengths: neither the stage nor the study sets feature '
                             'lengths; resolve them for the task with runner.stage_lengths.')
        return {k: int(v) for k, v in lengths.items()}

    def model_config(self, inference: bool = False):
        """The model as gin's get_model_config makes it from the same settings (inference: no
        dropout; the layout, scanned or not, stays that of the stage's checkpoints)."""
        from doa_jax.models.config import activation_dtype, get_config
        return get_config(self.model, dropout_rate=0.0 if inference else self.dropout_rate,
                          dtype=activation_dtype(self.activation_dtype,
                                                 'StageConfig.activation_dtype'),
                          scan_layers=self.scan_layers, remat_policy=self.remat_policy,
                          attention_impl=self.attention_impl, matmul_impl=self.matmul_impl)

    def mesh_config(self):
        from doa_jax.partitioning import MeshConfig
        return MeshConfig(data=self.mesh_data, model=self.mesh_model, fsdp=self.fsdp)

    def decode_mesh_config(self):
        """The mesh the stage's model decodes on when pseudo-labeling (as runs/pseudo_label.gin:
        MESH_DATA, MESH_MODEL; FSDP is train-only)."""
        from doa_jax.partitioning import MeshConfig
        return MeshConfig(data=self.mesh_data, model=self.mesh_model)

    def train_kwargs(self, *, model_dir: str, task: str, steps: int,
                     study_lengths: Mapping[str, int], random_seed: int = 0, loss_fn=None,
                     show_progress: bool = True, callbacks: Sequence = ()) -> dict:
        """The keyword arguments of `trainer.train` for this stage, as runs/finetune.gin binds
        them from its macros (TRAIN_STEPS = `steps`, KEEP_CHECKPOINTS = 1, EVAL_PERIOD = 0)."""
        from doa_jax.losses import cross_entropy_loss
        from doa_jax.optimizers import make_optimizer
        return dict(
                model_dir=model_dir, model_config=self.model_config(),
                mixture_or_task_name=task, task_feature_lengths=self.lengths(study_lengths),
                pack=self.pack, train_steps=steps, batch_size=self.batch_size,
                optimizer=make_optimizer(self.optimizer, self.learning_rate,
                                         schedule=self.schedule, warmup_steps=self.warmup_steps,
                                         total_steps=steps),
                loss_fn=loss_fn or cross_entropy_loss(z_loss=self.z_loss,
                                                      label_smoothing=self.label_smoothing),
                mesh_config=self.mesh_config(), random_seed=random_seed,
                num_microbatches=self.num_microbatches,
                loss_normalizing_factor=self.loss_normalizing_factor,
                initial_checkpoint_path=self.initial_checkpoint_path,
                log_period=min(self.log_period, steps), checkpoint_period=self.checkpoint_period,
                keep_checkpoints=1, eval_period=0, overlong=self.overlong,
                show_progress=show_progress, callbacks=list(callbacks))


@dataclasses.dataclass(frozen=True)
class Strategy:
    kind: str                 # 'annotate' | 'distill' | 'mixed'
    label_fraction: float     # share of the budget spent on gold labels

    @property
    def name(self) -> str:
        return f'mixed:{self.label_fraction:g}' if self.kind == 'mixed' else self.kind

    @property
    def id(self) -> str:
        if self.kind == 'mixed':
            return f'mixed{self.label_fraction:g}'
        return self.kind.replace('+', '_')


def parse_strategy(text: str) -> Strategy:
    t = text.strip().lower()
    if t == 'annotate':
        return Strategy('annotate', 1.0)
    if t == 'distill':
        return Strategy('distill', 0.0)
    if t in ('llm', 'human+llm'):
        return Strategy(t, 0.0)
    if t.startswith('mixed:'):
        try:
            f = float(t.split(':', 1)[1])
        except ValueError:
            f = -1.0
        if 0.0 < f < 1.0:
            return Strategy('mixed', f)
    raise ValueError(f'Unknown study strategy {text!r}; use {STRATEGY_HELP}.')


@dataclasses.dataclass(frozen=True)
class LLMAnnotator:
    """The LLM of the 'llm' strategies: an OpenAI-compatible endpoint and its $/token price
    (`price_model` names an `llm:` entry of the price table; default: `model`)."""

    base_url: str
    model: str
    price_model: str | None = None
    api_key_env: str = 'OPENAI_API_KEY'
    shots: int = 8
    max_tokens: int = 64
    temperature: float = 0.0
    concurrency: int = 4
    instruction: str | None = None
    timeout_s: float = 60.0


@dataclasses.dataclass
class StudySettings:
    """Everything a study point depends on besides its own (strategy, N, B)."""

    study_dir: str
    data: StudyData
    teacher: StageConfig
    student: StageConfig
    task_feature_lengths: Mapping[str, int] | None   # None: each task's measured, else the default
    prices: PriceTable
    seed: int = 0
    pool_size: int | None = None
    pool_start: int = 0
    chunk_size: int = 256
    infer_batch_size: int = 32
    eval_batch_size: int = 32
    student_loss: str = 'sequence'     # 'sequence' (CE on pseudo-labels) or 'token' (paper's KD)
    kd_temperature: float = 2.0
    count_student_compute: bool = False
    show_progress: bool = True
    llm: LLMAnnotator | None = None
    cost_model: ComputeCostModel = dataclasses.field(default_factory=ComputeCostModel)
    default_feature_lengths: Mapping[str, int] | None = None   # DEFAULT_FEATURE_LENGTHS

    @property
    def usd_per_label(self) -> float:
        return float(self.prices.usd_per_label(self.data.price_key))


def _json_dump(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))


def _json_load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# --- stages ------------------------------------------------------------------------------------

def stage_lengths(s: StudySettings, stage: StageConfig, task: str | None,
                  vocabulary=None) -> tuple[dict[str, int], str]:
    """(feature lengths, where they come from) of `stage` on the registered `task`, resolved as
    a run's TASK_FEATURE_LENGTHS / DEFAULT_FEATURE_LENGTHS are (`lengths.resolve`): the stage's
    own task_feature_lengths, else the study's TASK_FEATURE_LENGTHS, else the lengths measured
    for the task and its vocabulary (a study's tasks take those of `StudyData.lengths_task`),
    else the study's DEFAULT_FEATURE_LENGTHS. `vocabulary`: see `lengths.resolve_with_source`."""
    given = stage.task_feature_lengths or s.task_feature_lengths
    lengths, source = feature_lengths.resolve_with_source(task, given, s.default_feature_lengths,
                                                          vocabulary)
    if stage.task_feature_lengths:
        source = 'StageConfig.task_feature_lengths'
    return {k: int(v) for k, v in lengths.items()}, source


def train_rows(s: StudySettings, stage: StageConfig, task: str, lengths: Mapping[str, int],
               num_examples: int) -> int:
    """The rows one epoch of `task` makes for the epochs rule: its `num_examples` examples, or
    with `stage.pack` the packed rows the trainer makes of them (`train_data.epoch_rows`: the
    trainer's task pipeline and feature converter, at the stage's lengths and overlong rule and
    the study's shuffle seed; the study runs on one host)."""
    if not stage.pack:
        return num_examples
    from doa_jax import train_data
    return train_data.epoch_rows(task, lengths, seed=s.seed, overlong=stage.overlong, pack=True)


def pseudo_label_kwargs(s: StudySettings, lengths: Mapping[str, int] | None = None) -> dict:
    """How the study's teacher pseudo-labels (`pseudo_label.run_pseudo_labeling`'s settings, as
    runs/pseudo_label.gin names them): the teacher's model (loaded unscanned and without remat,
    as decoding runs it) and mesh, its stage's input length and decode length (targets - 1, so
    that EOS fits), the study's infer_batch_size and chunk_size. `lengths`: the teacher's as
    `stage_lengths` resolved them (default: its own or the study's)."""
    lengths = dict(lengths) if lengths else s.teacher.lengths(s.task_feature_lengths)
    config = s.teacher.model_config(inference=True).replace(scan_layers=False, remat_policy=None)
    return dict(model_config=config,
                max_input_length=lengths['inputs'], max_decode_length=lengths['targets'] - 1,
                batch_size=s.infer_batch_size, chunk_size=s.chunk_size,
                mesh_config=s.teacher.decode_mesh_config())


def kd_settings(s: StudySettings) -> dict:
    """The token-level KD loss of a student trained against the online teacher
    (student_loss='token'): `online_teacher_kd_loss`'s temperature, alpha and z_loss."""
    return dict(temperature=s.kd_temperature, alpha=0.0, z_loss=s.student.z_loss)


def _train(s: StudySettings, stage: StageConfig, model_dir: str, task: str, rows: int,
           loss_fn=None):
    """Trains (or resumes) a model on `task` for the epochs rule over `rows` rows per epoch
    (`train_rows`); every run prices itself into its dir's ledger."""
    from doa_jax import trainer
    from doa_jax.cost import CostCallback
    steps = stage.steps(rows)
    lengths, source = stage_lengths(s, stage, task)
    _json_dump_once(os.path.join(model_dir, 'stage.json'),
                    {'stage': dataclasses.asdict(stage), 'task': task, 'rows_per_epoch': rows,
                     'train_steps': steps, 'task_feature_lengths': lengths,
                     'lengths_source': source})
    return trainer.train(**stage.train_kwargs(
            model_dir=model_dir, task=task, steps=steps, study_lengths=lengths,
            random_seed=s.seed, loss_fn=loss_fn, show_progress=s.show_progress,
            callbacks=[CostCallback(prices=s.prices)]))


def _json_dump_once(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        _json_dump(path, obj)


def _evaluate(s: StudySettings, stage: StageConfig, params, task: str, cache: str) -> dict:
    """Scores params on the eval set once; the scores are kept in `cache` (a rerun reads them)."""
    cached = _json_load(cache)
    if cached is not None:
        return cached
    from doa_jax import trainer
    scores = trainer.evaluate(params, model_config=stage.model_config(inference=True),
                              mixture_or_task_name=task,
                              task_feature_lengths=stage_lengths(s, stage, task)[0],
                              batch_size=s.eval_batch_size, mesh_config=stage.mesh_config())
    _json_dump(cache, scores)
    return scores


def _read_ledger(directory: str, query, default):
    """query(Ledger) on the directory's ledger opened read-only; `default` when it has none."""
    from doa_jax.cost import Ledger
    from doa_jax.cost.ledger import ledger_path
    if not os.path.exists(ledger_path(directory)):
        return default
    ledger = Ledger(directory, readonly=True)
    try:
        return query(ledger)
    finally:
        ledger.close()


def _ledger_usd(directory: str, run_id: str | None = None) -> float:
    return _read_ledger(directory, lambda ledger: ledger.spent_usd(run_id), 0.0)


def _ledger_work_usd(directory: str, run_id: str | None = None) -> tuple[float, float]:
    """(what the work cost, what crashes added) of the runs in a directory's ledger: a run
    killed and resumed bills its redone steps and the crashed attempts' overheads as crash
    overhead (`Ledger.crash_overhead_usd`), so its work costs what an uninterrupted run's did."""
    return _read_ledger(directory, lambda ledger: ledger.work_usd(run_id), (0.0, 0.0))


class _Teacher:
    """A teacher fine-tuned on the first m gold labels, and its budget-capped pseudo-labels."""

    def __init__(self, s: StudySettings, m: int):
        self.s, self.m = s, m
        self.dir = os.path.join(s.study_dir, 'teachers', f'M{m}_{s.teacher.model}')
        self.run_id = os.path.basename(self.dir)
        self.pl_dir = os.path.join(self.dir, 'pseudo_labels')
        self.task = f'doa_study_teacher_M{m}'
        self.pool_task = f'doa_study_pool_M{m}'
        self._params = None
        self._lengths: tuple[dict[str, int], str] | None = None
        self._rows: int | None = None

    def prepare(self, order) -> None:
        """Writes the teacher's m gold labels and registers its task (what its lengths, rows and
        steps are resolved from)."""
        s = self.s
        path = os.path.join(self.dir, 'train.jsonl')
        if not os.path.exists(path):
            data_lib.write_jsonl(path, [s.data.train[i] for i in order[:self.m]])
        data_lib.register_train_task(self.task, s.data, path, _eval_path(s))

    @property
    def lengths(self) -> dict[str, int]:
        """The feature lengths the teacher trains, is evaluated and pseudo-labels with."""
        return self.lengths_and_source[0]

    @property
    def lengths_and_source(self) -> tuple[dict[str, int], str]:
        if self._lengths is None:
            self._lengths = stage_lengths(self.s, self.s.teacher, self.task)
        return self._lengths

    @property
    def rows(self) -> int:
        """Training rows per epoch (packed rows when the teacher packs); after `prepare`."""
        if self._rows is None:
            self._rows = train_rows(self.s, self.s.teacher, self.task, self.lengths, self.m)
        return self._rows

    def modelled_usd(self) -> float:
        """The teacher's fine-tuning priced by the FLOPs cost model (known before it runs; after
        `prepare`)."""
        s = self.s
        return s.cost_model.train_usd(s.prices, s.teacher.model_config(),
                                      s.teacher.steps(self.rows), s.teacher.batch_size,
                                      self.lengths)

    def train(self, order) -> float:
        """Fine-tunes (or resumes, or finds finished) the teacher; returns what the study's cost
        model charges for it."""
        s = self.s
        done = _json_load(os.path.join(self.dir, 'teacher.json'))
        if done is not None:      # finished earlier: reuse it (a no-op resume would bill time)
            return float(done['usd'])
        self.prepare(order)
        log.info('study: teacher %s on %d gold labels -> %s', s.teacher.model, self.m, self.dir)
        result = _train(s, s.teacher, self.dir, self.task, self.rows)
        self._params = result.state.params
        scores = _evaluate(s, s.teacher, self._params, self.task,
                           os.path.join(self.dir, 'eval.json'))
        measured, crash = _ledger_work_usd(self.dir, self.run_id)
        usd = measured if s.cost_model.measured else self.modelled_usd()
        lengths, source = self.lengths_and_source
        _json_dump(os.path.join(self.dir, 'teacher.json'),
                   {'m': self.m, 'model': s.teacher.model, 'scores': scores, 'usd': usd,
                    'usd_measured': measured, 'usd_crash_overhead_measured': crash,
                    'train_steps': s.teacher.steps(self.rows),
                    'rows_per_epoch': self.rows, 'pack': s.teacher.pack,
                    'task_feature_lengths': lengths, 'lengths_source': source})
        return usd

    def usd_measured(self) -> float | None:
        done = _json_load(os.path.join(self.dir, 'teacher.json'))
        return None if done is None else done.get('usd_measured')

    def crash_overhead_measured(self) -> float:
        done = _json_load(os.path.join(self.dir, 'teacher.json'))
        return float((done or {}).get('usd_crash_overhead_measured', 0.0))

    def pseudo_label(self, order, max_usd: float | None = None, limit: int | None = None) -> None:
        """Labels pool chunks, in pool order, until the run's own measured $ reaches `max_usd`
        or `limit` examples are labeled (a chunk boundary or the end of the pool)."""
        from doa_jax import pseudo_label as pl
        s = self.s
        pool_path = os.path.join(self.dir, 'pool.jsonl')
        if not os.path.exists(pool_path):
            # Targets withheld: the teacher sees sources only.
            data_lib.write_jsonl(pool_path, [{'source': src, 'target': ''}
                                             for _, src in _pool_rows(s, order, self.m)])
        data_lib.register_pool_task(self.pool_task, s.data, pool_path)
        if (max_usd is not None and max_usd <= 0) or (limit is not None and
                                                       self.labeled(limit) >= limit):
            return
        pl.run_pseudo_labeling(
                checkpoint_path=self.dir, output_dir=self.pl_dir,
                mixture_or_task_name=self.pool_task, **pseudo_label_kwargs(s, self.lengths),
                shard_id=0, num_shards=1, cost_ledger_dir=self.dir, prices=s.prices,
                max_usd=max_usd, limit=limit)

    @property
    def decode_length(self) -> int:
        return pseudo_label_kwargs(self.s, self.lengths)['max_decode_length']

    def labeled(self, below: int) -> int:
        """Pseudo-labels in completed chunks of the pool's first `below` examples."""
        from doa_jax import pseudo_label as pl
        if not os.path.isdir(self.pl_dir):
            return 0
        return sum(1 for r in pl.read_chunks(self.pl_dir) if int(r['index']) < below)

    def chunk_costs(self) -> list[dict]:
        """[{'first', 'last', 'seconds', 'usd'}] of every labeled chunk, as the ledger measured,
        the first charged the run's compiles too (`pseudo_label.work_usd`: what the work
        compiled, not what a killed attempt did), so that a kill changes no chunk's price beyond
        timing noise."""
        from doa_jax import pseudo_label as pl

        def costs(ledger) -> list[dict]:
            chunks = ledger.compute_entries('pseudo_labels', 'pseudo_label')
            if chunks:
                compiles = pl.work_usd(ledger, 'pseudo_labels')[0] - math.fsum(
                        c['usd'] for c in chunks)
                chunks[0]['usd'] += max(0.0, compiles)
            return chunks
        return _read_ledger(self.dir, costs, [])

    def pseudo_label_crash_overhead(self) -> float:
        """What crashes added to pseudo-labeling (the killed attempts' compiles)."""
        from doa_jax import pseudo_label as pl
        return _read_ledger(self.dir, lambda ledger: pl.work_usd(ledger, 'pseudo_labels')[1],
                            0.0)

    def modelled_chunks(self, order) -> list[dict]:
        """[{'first', 'last', 'usd'}] of every chunk of the pool, priced by the FLOPs model."""
        s = self.s
        size, cfg = len(_pool_rows(s, order, self.m)), s.teacher.model_config(inference=True)
        out = []
        for first in range(0, size, s.chunk_size):
            last = min(first + s.chunk_size, size) - 1
            out.append({'first': first, 'last': last, 'usd': s.cost_model.decode_usd(
                    s.prices, cfg, last - first + 1, self.lengths['inputs'],
                    self.decode_length)})
        return out

    def pseudo_labels(self, count: int) -> list[dict]:
        """The first `count` pseudo-labels as {'source', 'target'} (source without the prefix)."""
        from doa_jax import pseudo_label as pl
        records = sorted(pl.read_chunks(self.pl_dir), key=lambda r: r['index'])[:count]
        if len(records) < count:
            raise RuntimeError(f'{self.pl_dir} holds {len(records)} pseudo-labels but {count} were '
                               'priced; delete the directory to relabel.')
        prefix = self.s.data.prefix
        return [{'source': r['input'][len(prefix):] if r['input'].startswith(prefix)
                 else r['input'], 'target': r['prediction']} for r in records]

    def params(self):
        if self._params is None:
            from doa_jax.pseudo_label import load_teacher
            self._params = load_teacher(self.dir, self.s.teacher.model_config(inference=True))
        return self._params


def _eval_path(s: StudySettings) -> str:
    path = os.path.join(s.study_dir, 'data', 'eval.jsonl')
    if not os.path.exists(path):
        data_lib.write_jsonl(path, s.data.eval)
    return path


def _pool_rows(s: StudySettings, order, gold: int = 0) -> list[tuple[int, str]]:
    """(train index, source) of the unlabeled pool: after the largest N and after the `gold`
    labels the point itself uses, at most pool_size examples."""
    rest = order[max(s.pool_start, gold):]
    rest = rest[:s.pool_size] if s.pool_size else rest
    return [(int(i), s.data.train[i]['source']) for i in rest]


def _llm_labels(s: StudySettings, point: Mapping, order, budget: float) -> tuple[list, float]:
    """Labels pool examples with the LLM until `budget` is spent; returns (rows, $).

    Answers are cached study-wide, so a larger budget re-asks nothing it already paid for; each
    point's own ledger still prices every label it uses, which is what the point costs."""
    import glob

    from doa_jax import llm
    from doa_jax.cost import Ledger
    if s.llm is None:
        raise ValueError(f"strategy {point['strategy']!r} needs an LLM: set study.llm = "
                         '@LLMAnnotator() with base_url and model (a local one: python -m '
                         'doa_jax.serve).')
    cfg = s.llm
    pdir = _point_dir(s, point)
    out = os.path.join(pdir, 'llm_labels')
    n = int(point['n_start'])
    shots = [llm.Example(f'gold:{i}', s.data.train[i]['source'], s.data.train[i]['target'])
             for i in order[:min(cfg.shots, n)]]
    pool = [llm.Example(f'pool:{i}', src) for i, src in _pool_rows(s, order)]
    ledger = Ledger(pdir)
    client = llm.ChatClient(cfg.base_url, cfg.model, os.environ.get(cfg.api_key_env),
                            cfg.timeout_s)
    try:
        llm.annotate(pool, shots, client=client,
                     cache=llm.ResponseCache(os.path.join(s.study_dir, 'llm_cache.sqlite')),
                     ledger=ledger, prices=s.prices, run_id=point['point_id'], output_dir=out,
                     labels=s.data.labels,
                     instruction=cfg.instruction or llm.default_instruction(s.data.labels),
                     params={'max_tokens': cfg.max_tokens, 'temperature': cfg.temperature},
                     price_model=cfg.price_model, concurrency=cfg.concurrency,
                     budget_usd=budget, progress=s.show_progress, budget_counts_cached=True)
        usd = ledger.spent_usd(point['point_id'])
    finally:
        client.close()
        ledger.close()
    rows = []
    for path in sorted(glob.glob(os.path.join(out, 'llm_labels.jsonl-*'))):
        if path.endswith('.COMPLETED'):
            continue
        with open(path, encoding='utf-8') as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return [{'source': r['input'], 'target': r['prediction']} for r in rows], usd


def _affordable_prefix(chunks: Sequence[Mapping], usd: float) -> tuple[int, float]:
    """(examples, $) of the longest prefix of priced chunks that `usd` pays for."""
    n, spent = 0, 0.0
    for c in chunks:
        if c['first'] != n or spent + c['usd'] > usd + 1e-12:
            break
        n, spent = c['last'] + 1, spent + c['usd']
    return n, spent


def _point_dir(s: StudySettings, point: Mapping) -> str:
    return os.path.join(s.study_dir, 'points', point['point_id'])


def _train_student(s: StudySettings, point: Mapping, rows: Sequence[Mapping],
                   teacher: _Teacher | None) -> dict:
    """Trains the point's student on `rows`, scores it, and returns its record fields.

    A point whose student would train on exactly the data of an earlier point's, the same way
    (e.g. distill points whose budgets all buy the whole pool), reuses that student: training is
    deterministic, so it would be the same model. Its cost is still charged to both points."""
    pdir = _point_dir(s, point)
    path = os.path.join(pdir, 'train.jsonl')
    if not os.path.exists(path):
        data_lib.write_jsonl(path, rows)
    token_kd = teacher is not None and s.student_loss == 'token'
    key = _student_key(path, teacher.dir if token_kd else None)
    index_path = os.path.join(s.study_dir, 'students.json')
    first = (_json_load(index_path) or {}).get(key)     # the point that trained it first
    twin = os.path.join(s.study_dir, 'points', first) if first not in (None, point['point_id']) \
        else None
    cache = os.path.join(pdir, 'eval.json')
    scores = _json_load(cache)
    if scores is None and twin is not None:
        scores = _json_load(os.path.join(twin, 'eval.json'))
        if scores is not None:
            log.info('study: %s trains on the same data as %s; its student is reused.',
                     point['point_id'], os.path.basename(twin))
            _json_dump(cache, scores)
    # seqio task names allow [\w.:#]: a budget of 3e-05 puts a '-' in the point id.
    name = 'doa_study_' + re.sub(r'[^\w.:#]', '_', point['point_id'])
    task = data_lib.register_train_task(name, s.data, path, _eval_path(s),
                                        allow_empty_target=True)
    lengths, source = stage_lengths(s, s.student, task)
    # A student that trained already recorded its rows (packing tokenizes and packs the whole
    # set to count them); a rerun reads them back.
    trained = (_json_load(os.path.join(twin or pdir, 'student', 'stage.json')) or {}
               ) if scores is not None else {}
    epoch = trained.get('rows_per_epoch') or train_rows(s, s.student, task, lengths, len(rows))
    if scores is None:   # not trained and scored yet (a rerun after a crash resumes the run)
        twin = None
        loss_fn = None
        if token_kd:
            from doa_jax.distill_losses import online_teacher_kd_loss
            loss_fn = online_teacher_kd_loss(
                    teacher.params(), s.teacher.model_config(inference=True), **kd_settings(s))
        result = _train(s, s.student, os.path.join(pdir, 'student'), task, epoch, loss_fn)
        scores = _evaluate(s, s.student, result.state.params, task, cache)
        _json_dump(index_path, {**(_json_load(index_path) or {}), key: point['point_id']})
    metric = f'task/{s.data.metric}'
    if metric not in scores:
        raise KeyError(f'the metric {s.data.metric!r} is not among the scores of '
                       f'{point["point_id"]} '
                       f'({", ".join(sorted(k[5:] for k in scores if k.startswith("task/")))}); '
                       'set the study metric to one of them.')
    steps = s.student.steps(epoch)
    # Work only: what a kill and rerun added (redone steps, a second compile) is reported apart.
    measured, crash = _ledger_work_usd(os.path.join(twin or pdir, 'student'))
    if s.cost_model.measured:
        usd = measured
    else:
        usd = s.cost_model.train_usd(s.prices, s.student.model_config(), steps,
                                     s.student.batch_size, lengths,
                                     s.teacher.model_config() if token_kd else None)
    out = {'metric': scores[metric], 'metric_name': s.data.metric, 'student_steps': steps,
           'usd_student': usd, 'usd_student_measured': measured,
           'usd_crash_overhead_measured': crash,
           'student_feature_lengths': lengths, 'student_lengths_source': source,
           'student_pack': s.student.pack, 'student_rows_per_epoch': epoch,
           'scores': {k[5:]: v for k, v in scores.items() if k.startswith('task/')}}
    if twin is not None:
        out['student_of'] = os.path.basename(twin)
    return out


def _student_key(train_path: str, online_teacher_dir: str | None) -> str:
    """What makes two students the same model: their data, and the teacher of token-level KD."""
    import hashlib
    h = hashlib.sha256()
    with open(train_path, 'rb') as f:
        h.update(f.read())
    h.update(f'|{online_teacher_dir or ""}'.encode())
    return h.hexdigest()


def labels_bought(label_usd: float, per_label: float, available: int) -> int:
    """Gold labels `label_usd` buys at `per_label` each, at most the `available` unlabeled rows."""
    if per_label <= 0:
        return 0
    # label_usd / per_label, not //: 0.008 // 0.0001 is 79.0 in floating point.
    return max(min(int(label_usd / per_label + 1e-9), available), 0)


def run_point(s: StudySettings, point: Mapping, order) -> dict:
    """Runs one point end to end (resuming any finished stage) and returns its record fields."""
    strategy = parse_strategy(point['strategy'])
    n, budget = int(point['n_start']), float(point['budget_usd'])
    per_label = s.usd_per_label
    m = n + labels_bought(budget * strategy.label_fraction, per_label, len(s.data.train) - n)
    rec = {'n_labels': m, 'n_extra_labels': m - n, 'usd_labels': (m - n) * per_label,
           'n_pseudo': 0, 'usd_teacher': 0.0, 'usd_pseudo_label': 0.0, 'status': 'done',
           'cost_model': s.cost_model.label(),
           # where the models started (a pretrained checkpoint is a sunk cost: never charged)
           'student_initial_checkpoint': s.student.initial_checkpoint_path}
    if strategy.kind in ('distill', 'mixed'):
        rec['teacher_initial_checkpoint'] = s.teacher.initial_checkpoint_path
    if strategy.kind == 'annotate':
        rows = [s.data.train[i] for i in order[:m]]
        rec.update(_train_student(s, point, rows, None))
    elif strategy.kind in ('llm', 'human+llm'):
        rows, rec['usd_llm'] = _llm_labels(s, point, order, budget)
        rec['n_llm'] = len(rows)
        if not rows:
            return _infeasible(rec, f'{format_usd(budget)} bought no LLM label',
                               'no LLM label affordable')
        gold = [s.data.train[i] for i in order[:n]] if strategy.kind == 'human+llm' else []
        rec.update(_train_student(s, point, gold + rows, None))
    else:
        teacher = _Teacher(s, m)
        teacher.prepare(order)
        lengths, source = teacher.lengths_and_source
        rec.update({'teacher_feature_lengths': lengths, 'teacher_lengths_source': source,
                    'teacher_pack': s.teacher.pack})
        modelled = not s.cost_model.measured
        # The FLOPs model prices the teacher before it runs: one the budget cannot pay never runs.
        rec['usd_teacher'] = teacher.modelled_usd() if modelled else teacher.train(order)
        compute_usd = budget - rec['usd_labels'] - rec['usd_teacher']
        if compute_usd <= 0:
            return _infeasible(rec, f'the teacher alone costs {format_usd(rec["usd_teacher"])}, '
                                    f'more than the {format_usd(budget - rec["usd_labels"])} left '
                                    'for compute', 'the teacher costs more than the budget')
        if modelled:
            teacher.train(order)
            n_pseudo, pl_usd = _affordable_prefix(teacher.modelled_chunks(order), compute_usd)
            if n_pseudo:
                teacher.pseudo_label(order, limit=n_pseudo)
        else:
            teacher.pseudo_label(order, max_usd=compute_usd)
            n_pseudo, pl_usd = _affordable_prefix(teacher.chunk_costs(), compute_usd)
        if n_pseudo == 0:
            return _infeasible(rec, f'{format_usd(compute_usd)} left after the teacher does not '
                                    f'pay for one chunk of {s.chunk_size} pseudo-labels',
                               'no pseudo-labels affordable after the teacher')
        rec.update({'n_pseudo': n_pseudo, 'usd_pseudo_label': pl_usd})
        gold = [s.data.train[i] for i in order[:m]] if strategy.kind == 'mixed' else []
        rec.update(_train_student(s, point, gold + teacher.pseudo_labels(n_pseudo), teacher))
        measured_teacher = teacher.usd_measured()
        if measured_teacher is not None:
            rec['usd_teacher_measured'] = measured_teacher
            rec['usd_crash_overhead_measured'] = (rec.get('usd_crash_overhead_measured', 0.0)
                                                  + teacher.crash_overhead_measured()
                                                  + teacher.pseudo_label_crash_overhead())
            rec['usd_pseudo_label_measured'] = math.fsum(
                    c['usd'] for c in teacher.chunk_costs() if c['last'] < n_pseudo)
    rec.setdefault('usd_llm', 0.0)
    rec['usd_compute'] = rec['usd_teacher'] + rec['usd_pseudo_label'] + (
            rec.get('usd_student', 0.0) if s.count_student_compute else 0.0)
    return rec


def _infeasible(rec: dict, why: str, short: str) -> dict:
    """A point its budget cannot pay for: `why` is a sentence, `short` a label for plots."""
    log.warning('study: point infeasible: %s', why)
    rec.update({'status': 'infeasible', 'why': why, 'why_short': short, 'metric': None,
                'usd_compute': 0.0, 'usd_llm': 0.0})
    return rec


def study_points(strategies: Sequence[str], n_labels: Sequence[int],
                 budgets_usd: Sequence[float]) -> list[dict]:
    """The grid, cheapest budget first (so shared pseudo-labeling grows budget by budget)."""
    parsed = [parse_strategy(x) for x in strategies]
    if not parsed or not n_labels or not budgets_usd:
        raise ValueError('a study needs at least one strategy, one starting label count N and '
                         f'one budget; got strategies={list(strategies)}, n_labels='
                         f'{list(n_labels)}, budgets_usd={list(budgets_usd)}.')
    if any(b <= 0 for b in budgets_usd):
        raise ValueError(f'budgets_usd must be positive dollars, got {list(budgets_usd)}.')
    points = []
    for n in sorted(set(int(x) for x in n_labels)):
        for b in sorted(set(float(x) for x in budgets_usd)):
            for st in parsed:
                points.append({'point_id': f'{st.id}_N{n}_B{b:g}', 'strategy': st.name,
                               'n_start': n, 'budget_usd': b})
    return points


_SETTINGS_KEYS = ('data', 'seed', 'teacher', 'student', 'task_feature_lengths',
                  'default_feature_lengths', 'measured_feature_lengths', 'pool_size',
                  'chunk_size', 'student_loss', 'count_student_compute', 'usd_per_label',
                  'cost_model')


_STAGE_DEFAULTS = dataclasses.asdict(StageConfig())


def _check_same_study(study_dir: str, fingerprint: dict) -> None:
    path = os.path.join(study_dir, 'study.json')
    old = _json_load(path)
    if old is None:
        os.makedirs(study_dir, exist_ok=True)
        _json_dump(path, fingerprint)
        return
    for stage in ('teacher', 'student'):   # written before a StageConfig field existed: its
        if isinstance(old.get(stage), dict):   # default, which is what that study ran with
            old[stage] = {**_STAGE_DEFAULTS, **old[stage]}
    diff = [k for k in _SETTINGS_KEYS if old.get(k) != fingerprint.get(k)]
    if diff:
        raise ValueError(f'{study_dir} holds a study with other settings ({", ".join(diff)}: '
                         f'{[old.get(k) for k in diff]} there, {[fingerprint.get(k) for k in diff]} '
                         'now); finished points would mix. Use a new STUDY_DIR, or restore them.')


def _plain(lengths: Mapping[str, int] | None) -> dict[str, int] | None:
    return None if lengths is None else {k: int(v) for k, v in lengths.items()}


def _measured_lengths(s: StudySettings) -> dict[str, int] | None:
    """The lengths measured for the study's data and vocabulary, when a stage would take them
    (no TASK_FEATURE_LENGTHS): a rerun after they changed would mix points trained otherwise."""
    if s.task_feature_lengths is not None or (s.teacher.task_feature_lengths and
                                              s.student.task_feature_lengths):
        return None
    return feature_lengths.recorded(s.data.lengths_task, s.data.vocabulary) \
        if s.data.lengths_task else None


def run_study(s: StudySettings, strategies: Sequence[str], n_labels: Sequence[int],
              budgets_usd: Sequence[float]) -> tuple[list[str], list[str]]:
    """Runs every point not yet in results.json; returns (ran, skipped) point ids."""
    points = study_points(strategies, n_labels, budgets_usd)
    if max(int(n) for n in n_labels) >= len(s.data.train):
        raise ValueError(f'N={max(n_labels)} leaves no unlabeled pool: the train set has '
                         f'{len(s.data.train)} examples.')
    s.usd_per_label    # fails early (naming the fix) when the task has no label price
    s.cost_model = s.cost_model.resolved()
    s.cost_model.describe(s.prices)   # fails early when the device has no price or peak
    _check_same_study(s.study_dir, {
            'data': s.data.name, 'seed': s.seed, 'teacher': dataclasses.asdict(s.teacher),
            'student': dataclasses.asdict(s.student),
            'task_feature_lengths': _plain(s.task_feature_lengths),
            'default_feature_lengths': _plain(s.default_feature_lengths),
            'measured_feature_lengths': _measured_lengths(s), 'pool_size': s.pool_size,
            'chunk_size': s.chunk_size, 'student_loss': s.student_loss,
            'count_student_compute': s.count_student_compute, 'usd_per_label': s.usd_per_label,
            'cost_model': s.cost_model.as_dict(),
            'cost_model_description': s.cost_model.describe(s.prices)})
    if s.student_loss not in ('sequence', 'token'):
        raise ValueError(f"student_loss={s.student_loss!r}; use 'sequence' (cross entropy on the "
                         "teacher's outputs) or 'token' (the paper's KL at temperature T).")
    s.pool_start = max(int(n) for n in n_labels)
    order = s.data.order(s.seed)
    done = load_results(s.study_dir)
    todo = [p for p in points if p['point_id'] not in done]
    if todo:   # pretrained starting points: from the cache, or built now (never charged)
        if any(parse_strategy(p['strategy']).kind in ('distill', 'mixed') for p in todo):
            s.teacher = pretrained.resolve(s.teacher)
        s.student = pretrained.resolve(s.student)
    log.info('study: %d points, %d finished, %d to run, in %s', len(points),
             len(points) - len(todo), len(todo), s.study_dir)
    bar = None
    if s.show_progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc='study points', unit='point')

    def runner(point):
        if bar is not None:
            bar.set_postfix_str(point['point_id'])
        rec = run_point(s, point, order)
        if bar is not None:
            bar.update(1)
        return rec

    try:
        return run_points(s.study_dir, points, runner)
    finally:
        if bar is not None:
            bar.close()


def load_prices_for(data: StudyData, prices: str | PriceTable | None,
                    usd_per_label: float | None,
                    usd_per_device_hour: Mapping[str, float] | None = None) -> PriceTable:
    """The price table of a study: a YAML (or the default) plus the study's own overrides."""
    table = prices if isinstance(prices, PriceTable) else load_prices(prices)
    annotation = {data.price_key: usd_per_label} if usd_per_label is not None else None
    if annotation or usd_per_device_hour:
        table = table.with_overrides(devices=dict(usd_per_device_hour or {}),
                                     annotation=annotation, origin='study settings')
    return table
