"""The training loop: one trainer for teachers and students, with a pluggable loss.

`train(...)` is a plain typed function; only the entry point (`python -m doa_jax.train`) binds its
arguments from gin. Per logging interval the loop runs the jitted step `log_period` times without
touching the host, then fetches the interval's metric sums once, checks them for NaN/Inf, writes
TensorBoard scalars, and calls the callbacks. Checkpoints and evals happen only at interval ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from doa_jax import checkpoints, decoding, partitioning, run_identity, train_data
from doa_jax.callbacks import CallbackList, TrainerCallback, TrainPlan
from doa_jax.checkpoints import RunCheckpointer
from doa_jax.data import lengths as feature_lengths
from doa_jax.flops import (DEFAULT_CPU_PEAK_FLOPS, decode_flops_per_sequence, mfu,
                           peak_flops_per_device, train_flops_per_sequence)
from doa_jax.losses import LossFn, cross_entropy_loss, metrics_from_aux
from doa_jax.metrics_writer import TrainMetricsWriter
from doa_jax.models.config import T5Config
from doa_jax.models.t5 import T5
from doa_jax.train_state import TrainState, abstract_train_state, init_train_state
from doa_jax.train_step import make_eval_step, make_train_step, model_apply_fn, zero_metrics


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    step: int
    reason: str
    state: TrainState
    history: list[dict[str, float]]   # one row per logging interval (process-local copy)
    notes: list[str] = dataclasses.field(default_factory=list)   # e.g. an evaluation skipped


def _check_restorable(checkpointer: RunCheckpointer, step: int, abstract: TrainState,
                      model_dir: str) -> None:
    """A checkpoint of another model size or optimizer fails here with what differs (orbax's own
    error is a tree dump of dozens of lines)."""
    problems = checkpointer.mismatch(step, abstract)
    if not problems:
        return
    shown = problems[:8] + ([f'... and {len(problems) - 8} more'] if len(problems) > 8 else [])
    listing = '\n  '.join(shown)
    raise run_identity.RunConfigError(
            f'MODEL_DIR {model_dir} holds a checkpoint (step {step}, in '
            f'{checkpointer.directory}) of another model or optimizer than this run\'s, so it '
            f'cannot be resumed:\n  {listing}\nUse a new MODEL_DIR for this configuration (to '
            f'start from that checkpoint\'s weights with a model of the same size: '
            f'--gin.INITIAL_CHECKPOINT_PATH="\'{model_dir}\'"), or restore the settings that '
            f'wrote it.')


def _place_teacher(loss_fn: LossFn | None, mesh, rules, placed: tuple = (None, None)):
    """The parameters of `loss_fn.teacher` (an online KD teacher), placed once with `rules` on
    `mesh`: an argument of the jitted steps, never a constant of them. `placed` is (teacher,
    its placed parameters) already made, reused for the same teacher."""
    teacher = getattr(loss_fn, 'teacher', None)
    if teacher is None:
        return None
    return placed[1] if teacher is placed[0] else teacher.place(mesh, rules)


def _train_plan(model_config: T5Config, loss_fn: LossFn, eval_loss_fn: LossFn,
                lengths: Mapping[str, int], batch_size: int, train_steps: int, eval_period: int,
                eval_steps: int | None, decode_metrics: bool, peak: float | None,
                log_period: int = 0, checkpoint_period: int = 0) -> TrainPlan:
    """The FLOPs `train` will spend (doa_jax.flops), for the callbacks' estimates before anything
    compiles. An evaluation counts what it surely runs: one batch (the split's size is unknown
    until it is read), teacher-forced, plus one greedy decode step per row (decoding may stop at
    EOS)."""
    src, tgt = int(lengths['inputs']), int(lengths['targets'])

    def forward(config: T5Config | None) -> float:
        return 0.0 if config is None else train_flops_per_sequence(config, src, tgt) / 3

    def online_teacher(loss: LossFn) -> T5Config | None:
        return getattr(getattr(loss, 'teacher', None), 'config', None)

    per_step = batch_size * (train_flops_per_sequence(model_config, src, tgt)
                             + forward(online_teacher(loss_fn)))
    eval_flops = 0.0
    if eval_period and eval_steps != 0:
        per_row = forward(model_config) + forward(online_teacher(eval_loss_fn))
        if decode_metrics:
            per_row += decode_flops_per_sequence(model_config, src, 1)
        eval_flops = batch_size * per_row
    return TrainPlan(train_steps=train_steps, flops_per_step=per_step, eval_flops=eval_flops,
                     peak_flops_per_device=peak, log_period=max(0, log_period),
                     checkpoint_period=max(0, checkpoint_period),
                     eval_period=max(0, eval_period or 0))


def _check_microbatches(batch_size: int, num_microbatches: int, mesh) -> None:
    data = mesh.shape[partitioning.DATA_AXIS]
    if num_microbatches < 1 or batch_size % num_microbatches or (batch_size // num_microbatches) % data:
        raise ValueError(f'NUM_MICROBATCHES={num_microbatches} must divide BATCH_SIZE={batch_size} '
                         f'into microbatches that the mesh data axis ({data}) divides.')


def train(*, model_dir: str, model_config: T5Config, mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int] | None, train_steps: int, batch_size: int,
          optimizer: optax.GradientTransformation | None = None, loss_fn: LossFn | None = None,
          eval_loss_fn: LossFn | None = None,
          mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
          random_seed: int = 0, shuffle: bool = True, num_microbatches: int = 1,
          loss_normalizing_factor: float | str | None = None,
          initial_checkpoint_path: str | None = None, log_period: int = 100,
          checkpoint_period: int = 1000, keep_checkpoints: int = 3, eval_period: int = 0,
          eval_split: str = 'validation', eval_steps: int | None = None,
          decode_metrics: bool = True, max_decode_length: int | None = None,
          overlong: str = 'truncate', cpu_peak_flops: float = DEFAULT_CPU_PEAK_FLOPS,
          transfer_guard: bool = True, show_progress: bool = True,
          callbacks: Sequence[TrainerCallback] = (),
          extra_callbacks: Sequence[TrainerCallback] = (),
          run_fingerprint: Mapping[str, Any] | None = None,
          allow_config_change: bool = False, pack: bool = False,
          default_feature_lengths: Mapping[str, int] | None = None) -> TrainResult:
    """Trains `model_config` on a seqio task; resumes from MODEL_DIR's latest checkpoint if any.

    `shuffle=False` streams each host's shard in order (for debugging and the multi-process test).
    `callbacks` are the user's (gin: `train.callbacks`); `extra_callbacks` are added by the entry
    point (e.g. the run record) so that binding one never drops the other. `eval_loss_fn` (default:
    `loss_fn`) is the teacher-forced eval loss: offline token-level KD trains on stored teacher
    top-k that the gold eval split does not have, so its run file evaluates cross entropy.

    `pack=True` packs several training examples into each row, as t5x does (the run configs'
    PACK); evaluation stays unpacked. `task_feature_lengths=None` takes the lengths measured
    for the task and its vocabulary (`doa_jax.data.lengths`), else `default_feature_lengths`.

    MODEL_DIR records what it trains (`run_identity.training_fingerprint`: task, model, batch,
    seed, plus `run_fingerprint`, the entry point's description of the optimizer and loss). A
    resume with other settings fails listing them, unless `allow_config_change` (gin:
    ALLOW_CONFIG_CHANGE); a checkpoint of another model or optimizer fails naming what differs.

    A final evaluation (eval_period > 0) that finishes is recorded in MODEL_DIR/run.json. A rerun
    whose checkpoint is already at `train_steps` without that record (the run was killed during
    its final evaluation, or skipped it for the BUDGET_USD cap) trains nothing and runs only the
    final evaluation.
    """
    callbacks = CallbackList([*callbacks, *extra_callbacks])
    optimizer = optimizer or optax.adafactor(1e-3, decay_rate=0.8)
    loss_fn = loss_fn or cross_entropy_loss()
    mesh = partitioning.make_mesh(mesh_config)
    partitioning.check_batch_size(batch_size, mesh)
    _check_microbatches(batch_size, num_microbatches, mesh)
    param_rules = partitioning.param_rules(mesh_config.fsdp)
    act_rules = partitioning.STANDARD_RULES
    train_data.get_task(mixture_or_task_name)   # fail fast, listing the registered tasks
    task_feature_lengths = feature_lengths.resolve(mixture_or_task_name, task_feature_lengths,
                                                   default_feature_lengths)
    os.makedirs(model_dir, exist_ok=True)

    model = T5(model_config)
    src_len = task_feature_lengths['inputs']
    tgt_len = task_feature_lengths['targets']

    def init_params(rng):
        return model.init(rng, jnp.ones((1, src_len), jnp.int32),
                          jnp.ones((1, tgt_len), jnp.int32))['params']

    rng = jax.random.PRNGKey(random_seed)
    with jax.set_mesh(mesh):
        abstract, shardings = abstract_train_state(init_params, optimizer, mesh, param_rules, rng)
    checkpointer = RunCheckpointer(model_dir, keep_checkpoints)
    latest = checkpointer.latest_step()
    fingerprint = run_identity.training_fingerprint(
            mixture_or_task_name=mixture_or_task_name, model_config=model_config,
            task_feature_lengths=task_feature_lengths, batch_size=batch_size,
            random_seed=random_seed, shuffle=shuffle,
            loss_normalizing_factor=loss_normalizing_factor, extra=run_fingerprint)
    accepted = run_identity.check_training_fingerprint(model_dir, fingerprint, latest,
                                                       allow_change=allow_config_change)
    if latest is not None:
        _check_restorable(checkpointer, latest, abstract, model_dir)
    if jax.process_index() == 0:
        run_identity.record_training_fingerprint(model_dir, fingerprint, latest, accepted)
    if latest is not None:
        state, data_position = checkpointer.restore(latest, shardings, abstract)
        start_step = int(data_position['step'])
        skip = int(data_position['batches_consumed'])
        logging.info('Resuming from %s at step %d.', checkpointer.directory, start_step)
    else:
        params = (checkpoints.load_checkpoint(initial_checkpoint_path, model_config)
                  if initial_checkpoint_path else None)
        state = init_train_state(init_params, optimizer, shardings, rng, params, abstract)
        start_step, skip = 0, 0

    apply_fn = model_apply_fn(model)
    step_fn = make_train_step(apply_fn, loss_fn, optimizer, mesh, act_rules, shardings,
                              loss_normalizing_factor=loss_normalizing_factor,
                              num_microbatches=num_microbatches, dropout_seed=random_seed + 1,
                              use_dropout=model_config.dropout_rate > 0)
    teacher_params = _place_teacher(loss_fn, mesh, param_rules)
    counter = train_data.OverlongCounter()
    ds = train_data.host_dataset(mixture_or_task_name, task_feature_lengths, 'train', batch_size,
                                 seed=random_seed, shuffle=shuffle, skip_batches=skip,
                                 overlong=overlong, counter=counter, pack=pack)
    batches = train_data.numpy_batches(ds, vocab_size=model_config.vocab_size)
    metrics = jax.device_put(zero_metrics(), partitioning.replicated(mesh))
    writer = TrainMetricsWriter(model_dir, train_steps, start_step, show_progress)
    flops_per_step = batch_size * train_flops_per_sequence(model_config, src_len, tgt_len)
    peak = peak_flops_per_device(cpu_peak=cpu_peak_flops)
    eval_loss = eval_loss_fn or loss_fn
    evaluator = _Evaluator(model_config, apply_fn, eval_loss, mesh, act_rules,
                           mixture_or_task_name, task_feature_lengths, eval_split, batch_size,
                           eval_steps, decode_metrics, max_decode_length or tgt_len,
                           loss_normalizing_factor, random_seed,
                           _place_teacher(eval_loss, mesh, param_rules,
                                          (getattr(loss_fn, 'teacher', None), teacher_params)))
    # The plan also says where the loop checks (interval_end, eval_due): the callbacks' look
    # ahead and the loop agree on the steps between two checks.
    plan = _train_plan(model_config, loss_fn, eval_loss, task_feature_lengths, batch_size,
                       train_steps, eval_period, eval_steps, decode_metrics, peak, log_period,
                       checkpoint_period)
    callbacks.on_plan(plan=plan)
    callbacks.on_train_start(model_dir=model_dir, start_step=start_step, mesh=mesh)

    step = start_step
    history: list[dict[str, float]] = []
    notes: list[str] = []
    reason = 'done'

    def evaluate_at(at: int, params) -> None:
        """Runs the evaluation due at step `at` (its row ends `history`); a final one is then
        recorded in MODEL_DIR, so that a rerun knows it need not evaluate again."""
        t_eval = time.perf_counter()
        scalars = evaluator.run(params)
        writer.write_eval(at, scalars)
        history[-1].update({f'eval/{k}': v for k, v in scalars.items()})
        callbacks.on_eval_end(step=at, seconds=time.perf_counter() - t_eval)
        if at == train_steps:
            _record_final_evaluation(model_dir, at)

    def skip_note(at: int, why: str) -> None:
        notes.append(f'{"final " if at == train_steps else ""}evaluation at step {at} skipped: '
                     f'{why}; the checkpoint at step {at} is kept')
        logging.warning('%s.', notes[-1])

    try:
        compiled = None
        with jax.set_mesh(mesh):
            while step < train_steps:
                end = plan.interval_end(step)
                first = step
                if compiled is None:
                    batch = train_data.to_global(next(batches), mesh, batch_size)
                    t0 = time.perf_counter()
                    compiled = step_fn.lower(state, batch, metrics, teacher_params).compile()
                    compile_s = time.perf_counter() - t0
                    callbacks.on_compile(seconds=compile_s)
                    writer.write_compile(step, compile_s)
                    pending = batch
                else:
                    pending = None
                t0 = time.perf_counter()
                guard = jax.transfer_guard('disallow') if transfer_guard else contextlib.nullcontext()
                with guard:
                    while step < end:
                        batch = pending if pending is not None else train_data.to_global(
                                next(batches), mesh, batch_size)
                        pending = None
                        state, metrics = compiled(state, batch, metrics, teacher_params)
                        step += 1
                host = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                metrics = jax.device_put(zero_metrics(), partitioning.replicated(mesh))
                if int(host['nonfinite_step']) >= 0:
                    bad = int(host['nonfinite_step']) + 1
                    raise NonFiniteLossError(
                            f'The loss or gradient norm is NaN/Inf at step {bad}; training stopped. '
                            f'The last good checkpoint ({checkpointer.latest_step()}) in '
                            f'{checkpointer.directory} is kept. Lower the learning rate, check the '
                            'data, or use float32 activations.')
                row = _interval_scalars(host, seconds, batch_size, flops_per_step, peak, mesh)
                writer.write_train(step, row, step - first)
                history.append({'step': step, **row})
                train_data.log_overlong(counter, mixture_or_task_name)
                callbacks.on_steps_end(first_step=first + 1, last_step=step, seconds=seconds)
                for saved in checkpointer.durable():
                    callbacks.on_checkpoint(step=saved)
                stop = callbacks.should_stop(step=step)
                if stop and step < train_steps and callbacks.stop_reason:
                    notes.append(f'stopped at step {step} by {callbacks.stop_reason}')
                eval_due = plan.eval_due(step)
                # An evaluation is billed too: the callbacks may skip one they cannot pay for.
                skipped = callbacks.skip_eval(step=step, final=step == train_steps) \
                    if eval_due else None
                if skipped:
                    skip_note(step, skipped)
                    stop = True
                if step % checkpoint_period == 0 or step == train_steps or stop:
                    # Asynchronous: the files are written while the next steps run.
                    checkpointer.save(step, state, {'step': step, 'batches_consumed': skip + step
                                                    - start_step})
                if eval_due and not skipped:
                    evaluate_at(step, state.params)
                if stop and step < train_steps:
                    reason = 'stopped'
                    break
            if step == start_step == train_steps and plan.eval_due(step) and \
                    _final_evaluation_step(model_dir) != step:
                # An earlier attempt saved the final checkpoint but did not finish (or skipped,
                # for the BUDGET_USD cap) the final evaluation: it runs now, without training.
                history.append({'step': step})
                skipped = callbacks.skip_eval(step=step, final=True)
                if skipped:
                    skip_note(step, skipped)
                else:
                    evaluate_at(step, state.params)
    except BaseException:
        try:    # the saves already started complete: the last good checkpoint stays usable
            for saved in checkpointer.durable(wait=True):
                callbacks.on_checkpoint(step=saved)
        finally:
            callbacks.on_train_end(step=step, reason='error')
            writer.close()
        raise
    for saved in checkpointer.durable(wait=True):
        callbacks.on_checkpoint(step=saved)
    callbacks.on_train_end(step=step, reason=reason)
    writer.close()
    checkpointer.close()
    return TrainResult(step=step, reason=reason, state=state, history=history, notes=notes)


_FINAL_EVALUATION = 'final_evaluation_step'   # in MODEL_DIR/run.json


def _record_final_evaluation(model_dir: str, step: int) -> None:
    if jax.process_index() == 0:
        run_identity.update_json(os.path.join(model_dir, run_identity.RUN_FILE),
                                 **{_FINAL_EVALUATION: int(step)})


def _final_evaluation_step(model_dir: str) -> int | None:
    """The TRAIN_STEPS whose final evaluation MODEL_DIR's run finished, if any."""
    step = (run_identity.read_json(os.path.join(model_dir, run_identity.RUN_FILE)) or {}).get(
            _FINAL_EVALUATION)
    return step if isinstance(step, int) else None


def evaluate(params, *, model_config: T5Config, mixture_or_task_name: str,
             task_feature_lengths: Mapping[str, int], batch_size: int,
             mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
             split: str = 'validation', eval_steps: int | None = None,
             decode_metrics: bool = True, max_decode_length: int | None = None,
             loss_fn: LossFn | None = None, random_seed: int = 0) -> dict[str, float]:
    """Teacher-forced loss/accuracy and decode-based task metrics (`task/<name>`) of `params`
    on a task split, as the trainer's periodic eval computes them."""
    mesh = partitioning.make_mesh(mesh_config)
    partitioning.check_batch_size(batch_size, mesh)
    train_data.get_task(mixture_or_task_name)
    loss_fn = loss_fn or cross_entropy_loss()
    evaluator = _Evaluator(model_config, model_apply_fn(T5(model_config)), loss_fn, mesh,
                           partitioning.STANDARD_RULES, mixture_or_task_name,
                           task_feature_lengths, split, batch_size, eval_steps, decode_metrics,
                           max_decode_length or task_feature_lengths['targets'], None,
                           random_seed, _place_teacher(loss_fn, mesh,
                                                       partitioning.param_rules(mesh_config.fsdp)))
    with jax.set_mesh(mesh):
        return evaluator.run(params)


def _interval_scalars(host: Mapping[str, Any], seconds: float, batch_size: int,
                      flops_per_step: float, peak: float | None, mesh) -> dict[str, float]:
    n = max(float(host['num_steps']), 1.0)
    aux = metrics_from_aux(host)
    steps_per_s = n / max(seconds, 1e-9)
    return {
        'loss': float(host['loss']) / n,
        'accuracy': aux['accuracy'],
        'cross_ent_loss': aux['cross_ent_loss'] / n,
        'z_loss': aux['z_loss'] / n,
        'grad_norm': float(host['grad_norm']) / n,
        'timing/steps_per_second': steps_per_s,
        'timing/seqs_per_second': batch_size * steps_per_s,
        'timing/target_tokens_per_second': float(host['num_tokens']) / max(seconds, 1e-9),
        # MFU is left out when the device kind has no peak in the catalog (warned once).
        **({} if peak is None else
           {'timing/mfu': mfu(flops_per_step, 1.0 / steps_per_s, mesh.size, peak)}),
    }


class _Evaluator:
    """Teacher-forced loss/accuracy over the eval split, plus decode-based task metrics."""

    def __init__(self, config, apply_fn, loss_fn, mesh, rules, task_name, lengths, split,
                 batch_size, eval_steps, decode_metrics, max_decode_length, lnf, seed,
                 teacher_params=None):
        self.config, self.mesh, self.task_name, self.lengths = config, mesh, task_name, lengths
        self.teacher_params = teacher_params    # the eval loss's online teacher, placed
        self.split, self.batch_size, self.eval_steps = split, batch_size, eval_steps
        self.decode_metrics, self.max_decode_length, self.seed = (decode_metrics,
                                                                  max_decode_length, seed)
        self.step = make_eval_step(apply_fn, loss_fn, mesh, rules, loss_normalizing_factor=lnf)
        # One jitted decoder for every evaluation: eval batches have one shape, so it compiles
        # once; each evaluation only swaps in the current parameters.
        self.decoder = (decoding.Decoder(config, max_decode_length=max_decode_length,
                                         batch_size=batch_size)
                        if decode_metrics else None)

    def _batches(self):
        counter = train_data.OverlongCounter()
        ds = train_data.host_dataset(self.task_name, self.lengths, self.split, self.batch_size,
                                     seed=self.seed, shuffle=False, repeat=False, counter=counter)
        yield from self._padded(ds)
        cut = counter.new_since_last()
        if cut:
            logging.warning(
                    '%d %s examples of %s are longer than TASK_FEATURE_LENGTHS=%s and were '
                    'truncated; where a gold target was cut, the task metrics score against the '
                    'cut target. Raise the lengths to evaluate them in full.', cut,
                    self.split, self.task_name, dict(self.lengths))

    def _padded(self, ds):
        local = self.batch_size // jax.process_count()
        for i, b in enumerate(train_data.numpy_batches(ds, vocab_size=self.config.vocab_size)):
            if self.eval_steps is not None and i >= self.eval_steps:
                break
            n = b['encoder_input_tokens'].shape[0]
            if n < local:    # pad the last batch with all-zero (weightless) rows: one shape only
                b = {k: np.concatenate([v, np.zeros((local - n,) + v.shape[1:], v.dtype)])
                     for k, v in b.items()}
            yield b

    def run(self, params) -> dict[str, float]:
        totals: dict[str, float] = {}
        batches = []
        for b in self._batches():
            out = jax.device_get(self.step(params, train_data.to_global(b, self.mesh,
                                                                        self.batch_size),
                                           self.teacher_params))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            totals['num_batches'] = totals.get('num_batches', 0.0) + 1
            batches.append(b)
        n = max(totals.get('num_batches', 1.0), 1.0)
        scalars = {'loss': totals.get('loss', 0.0) / n,
                   'accuracy': totals.get('correct', 0.0) / max(totals.get('num_tokens', 1.0), 1.0)}
        if self.decode_metrics:
            scalars.update(self.task_metrics(params, batches))
        return scalars

    def task_metrics(self, params, batches) -> dict[str, float]:
        """Greedy-decodes the eval inputs and scores them with the task's metric functions."""
        self.decoder.load(params)
        task = train_data.get_task(self.task_name)
        vocab = task.output_features['targets'].vocabulary
        targets, predictions = [], []
        for b in batches:
            enc = train_data.to_global({**b}, self.mesh, self.batch_size)['encoder_input_tokens']
            tokens, _ = self.decoder.decode_batch(enc)
            tokens = np.asarray(jax.device_get(
                    multihost_utils.process_allgather(tokens, tiled=True)))
            gold = np.asarray(jax.device_get(multihost_utils.process_allgather(
                    train_data.to_global(b, self.mesh, self.batch_size)['decoder_target_tokens'],
                    tiled=True)))
            for row_t, row_p in zip(gold, tokens):
                if not row_t.any():
                    continue
                targets.append(vocab.decode(_until_eos(row_t, vocab.eos_id)))
                predictions.append(vocab.decode(_until_eos(row_p, vocab.eos_id)))
        # The prepared copy of the weights (cast, unscanned) must not stay beside the train
        # state while training continues: for T5-XXL on 4 devices it is 5.6 GB per device.
        self.decoder.weights = None
        scores: dict[str, float] = {}
        for fn in getattr(task, 'predict_metric_fns', []) or getattr(task, 'metric_fns', []):
            scores.update({f'task/{k}': float(v) for k, v in fn(targets, predictions).items()})
        return scores


def _until_eos(row: np.ndarray, eos_id: int) -> list[int]:
    out = []
    for t in row.tolist():
        if t == eos_id or t == 0:
            break
        out.append(int(t))
    return out
