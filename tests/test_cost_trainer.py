"""The cost callback inside the real trainer: a budget cap stops a tiny run before its next
interval could pass the cap, with its checkpoint intact; a run its cap cannot pay for is refused
before compiling (or right after, when compiling used the cap up); an evaluation the cap cannot
pay for is skipped, its checkpoint kept."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from doa_jax import checkpoints, gin_utils, trainer
from doa_jax.callbacks import TrainerCallback
from doa_jax.checkpoints import RunCheckpointer
from doa_jax.cost import BudgetExceededError, CostCallback, Ledger, default_prices
from doa_jax.models import get_config
import tasks.toy  # noqa: F401  (registers doa_toy)

CPU_RATE = float(default_prices().usd_per_device_hour('cpu'))
CPU_PEAK = default_prices().peak_flops('cpu')       # FLOP/s; the trainer's CPU_PEAK_FLOPS too


def _train(model_dir, steps: int, callback: TrainerCallback, *more: TrainerCallback,
           **kw) -> trainer.TrainResult:
    args = dict(log_period=2, checkpoint_period=1000, eval_period=0)
    return trainer.train(
        model_dir=str(model_dir), model_config=get_config('t5_1_1_tiny', dtype=np.float32),
        mixture_or_task_name='doa_toy', task_feature_lengths={'inputs': 32, 'targets': 4},
        train_steps=steps, batch_size=4, show_progress=False, callbacks=[callback, *more],
        **{**args, **kw})


class _TenMsSteps(CostCallback):
    """The cost meter billing each step 10 ms, whatever the CPU took: the trainer, its checks
    and checkpoints are real, the clock of the steps simulated, so the stop step is hand-worked."""

    def on_steps_end(self, *, first_step, last_step, seconds):
        super().on_steps_end(first_step=first_step, last_step=last_step,
                             seconds=0.01 * (last_step - first_step + 1))


def test_budget_cap_stops_a_real_run_before_the_cap_with_its_checkpoint_intact(tmp_path):
    model_dir = tmp_path / 'run'
    # Checks at steps 2, 4, 5 (checkpoint period), 6, 8, ...; compile and host time unbilled.
    # The cap is 75 ms of steps. At step 5, 50 ms spent + 1 step ahead (10 ms/step over the
    # last 1) fits; at step 6, 60 ms + the 2 steps to step 8 = 80 ms does not: it stops at 6.
    # (The last interval's 10 ms unscaled would have let it run to 8, past the cap.)
    budget = 0.075 * jax.device_count() * CPU_RATE / 3600
    cb = _TenMsSteps(budget_usd=budget, include_compile=False, include_other=False)
    result = _train(model_dir, 20, cb, checkpoint_period=5)
    assert result.reason == 'stopped' and result.step == 6 and cb.stopped_at == 6
    assert cb.stop_reason.startswith('the BUDGET_USD cap: spent $0.0')
    assert ' for the next 2 step(s) (0.01 s/step, measured over the last 1) = ' in cb.stop_reason
    assert result.notes == [f'stopped at step 6 by {cb.stop_reason}']   # in the exit summary
    ledger = Ledger(model_dir)
    s = ledger.stage_summary('run', 'train')
    assert s.end_reason == 'stopped' and s.last_step == 6 and s.step_seconds == pytest.approx(0.06)
    assert s.device_kind == jax.devices()[0].device_kind
    assert s.compile_seconds > 0 and s.other_seconds > 0      # recorded, though not billed
    assert s.compile_usd == 0 and s.other_usd == 0
    assert ledger.spent_usd('run') <= budget

    assert [(f, l) for f, l, _ in ledger.counted_step_intervals('run', 'train')] == [
        (1, 2), (3, 4), (5, 5), (6, 6)]
    ckpt = RunCheckpointer(str(model_dir))
    assert ckpt.latest_step() == 6
    ckpt.close()
    # The checkpoint is intact: it holds the stopped run's weights (a resume from it, counting
    # each step once, is tests/test_cost_resume.py's, without a second compile here).
    saved = checkpoints.load_checkpoint(model_dir, get_config('t5_1_1_tiny', dtype=np.float32))
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(result.state.params))


class _Hooks(TrainerCallback):
    """Which hooks the trainer called."""

    def __init__(self):
        self.called: list[str] = []

    def on_plan(self, *, plan):
        self.called.append('plan')

    def on_compile(self, *, seconds):
        self.called.append('compile')

    def on_eval_end(self, *, step, seconds):
        self.called.append(f'eval {step}')


@pytest.mark.fault_injection
def test_a_cap_below_the_cheapest_possible_run_is_refused_before_compiling(tmp_path):
    # t5_1_1_tiny (d=32, 4 heads x 12, gated MLP 48, 2+2 layers, vocab 512) at 32 input and 4
    # target tokens, by hand: matmul weights seen per source token 2*(32*48*4 + 3*32*48) (encoder)
    # + 2*2*32*48 (cross K/V) = 27,648, per target token 2*(32*48*4 + 2*32*48 + 3*32*48) +
    # 32*512 = 44,032; 6 x (27,648*32 + 44,032*4) = 6,365,184 FLOPs, plus attention
    # 12 * 48 * (2*32*32 + 2*(4*4/2 + 32*4)) = 1,336,320: 7,701,504 per sequence, x 4 a step.
    lowest = 100 * 4 * 7_701_504 / CPU_PEAK * CPU_RATE / 3600      # 100 steps at the peak
    assert f'{lowest:.3g}' == '9.78e-07'                 # on the catalog's CPU: $0.000000978
    hooks = _Hooks()
    cap = CostCallback(budget_usd=1e-7, planned_steps=100)
    with pytest.raises(BudgetExceededError) as e:
        _train(tmp_path / 'run', 100, cap, hooks)
    msg = str(e.value)
    assert 'Refusing to start: its lowest possible cost $0.000000978 = ' in msg
    assert 'the remaining budget $0.000000100 (BUDGET_USD $0.000000100 - already spent $0)' in msg
    assert 'force=True' in msg and '$0.00 ' not in msg and '$-' not in msg
    assert hooks.called == ['plan']                    # refused before the train step compiled
    ledger = Ledger(tmp_path / 'run')
    assert ledger.runs() == [] and ledger.spent_usd() == 0  # nothing recorded, not even an attempt
    ckpt = RunCheckpointer(str(tmp_path / 'run'))
    assert ckpt.latest_step() is None
    ckpt.close()


@pytest.mark.fault_injection
def test_a_cap_that_compiling_used_up_is_refused_before_the_first_step(tmp_path):
    # 10 steps cost at least $0.0000000978 (a tenth of the above): the first check passes. The
    # cap is 1.8 ms of the CPU device, less than compiling the train step takes.
    hooks = _Hooks()
    cap = CostCallback(budget_usd=2e-7, planned_steps=10)
    with pytest.raises(BudgetExceededError) as e:
        _train(tmp_path / 'run', 10, hooks, cap)        # hooks first: it sees the compile
    msg = str(e.value)
    assert msg.startswith('Compiling the train step took ')
    assert 'Refusing to start: its lowest possible cost $0.0000000978 = ' in msg
    assert 'the remaining budget, none (BUDGET_USD $0.000000200, already spent $0.0' in msg
    assert hooks.called == ['plan', 'compile']           # refused before any step ran
    ledger = Ledger(tmp_path / 'run')
    assert ledger.counted_step_intervals('run', 'train') == []
    s = ledger.stage_summary('run', 'train')
    assert s.compile_usd > 2e-7 and s.end_reason == 'error'


def test_the_plan_counts_an_online_teacher_and_the_least_an_evaluation_runs():
    import types
    tiny = get_config('t5_1_1_tiny', dtype=np.float32)
    kd = types.SimpleNamespace(teacher=types.SimpleNamespace(config=tiny))   # tiny teaches tiny
    plan = trainer._train_plan(tiny, kd, None, {'inputs': 32, 'targets': 4}, batch_size=4,
                               train_steps=10, eval_period=5, eval_steps=None,
                               decode_metrics=True, peak=CPU_PEAK)
    # A step: 7,701,504 FLOPs a sequence (see above) + the teacher's forward, a third of it.
    assert plan.flops_per_step == 4 * (7_701_504 + 2_567_168)
    # An evaluation: one batch teacher-forced (2,567,168 a row) and one decode step a row: the
    # encoder and cross K/V over 32 tokens, 2*(27,648*32 + 44,032) = 1,857,536, and attention
    # 4 * 48 * (2*32*32 + 2*(1 + 32)) = 405,888.
    assert plan.eval_flops == 4 * (2_567_168 + 1_857_536 + 405_888)
    assert plan.peak_flops_per_device == CPU_PEAK and plan.train_steps == 10
    none = trainer._train_plan(tiny, None, None, {'inputs': 32, 'targets': 4}, batch_size=4,
                               train_steps=10, eval_period=0, eval_steps=None,
                               decode_metrics=True, peak=None)
    assert none.flops_per_step == 4 * 7_701_504 and none.eval_flops == 0


class _LeaveHalfAnEval(TrainerCallback):
    """After the first evaluation, lowers the cost meter's cap to what is spent plus half of
    what that evaluation cost: the steps after it fit, another evaluation does not."""

    def __init__(self, cost: CostCallback):
        self.cost = cost

    def on_eval_end(self, *, step, seconds):
        if step == 2:
            self.cost.budget_usd = self.cost.spent_usd() + seconds / 2 * CPU_RATE / 3600


@pytest.mark.fault_injection
@pytest.mark.parametrize('steps', [4, 6])
def test_an_evaluation_the_cap_cannot_pay_for_is_skipped_and_the_checkpoint_kept(tmp_path, steps):
    """Evaluations at steps 2 and 4; after the first, half an evaluation's cost is left. With
    4 steps the final evaluation is skipped, the run done; with 6 the one at step 4 is skipped
    and the run stops there (the cap could not pay for much more). Host time ('other': the
    checkpoint saved after the last check) is not billed here, so the sum is exact."""
    cost = CostCallback(budget_usd=1.0, include_other=False)
    hooks, summary = _Hooks(), gin_utils.RunSummary()
    result = _train(tmp_path / 'run', steps, cost, _LeaveHalfAnEval(cost), hooks, summary,
                    eval_period=2, eval_steps=1, decode_metrics=False)
    assert hooks.called.count('compile') == 1 and 'eval 2' in hooks.called
    assert 'eval 4' not in hooks.called                   # the evaluation at step 4 did not run
    assert result.step == 4 and result.reason == ('done' if steps == 4 else 'stopped')
    # With 6 steps the stop check at step 4 already saw the evaluation and 2 more steps ahead.
    assert len(result.notes) == (1 if steps == 4 else 2)
    assert steps == 4 or result.notes[0].startswith('stopped at step 4 by the BUDGET_USD cap: ')
    note = result.notes[-1]
    final = 'final ' if steps == 4 else ''
    assert note.startswith(f'{final}evaluation at step 4 skipped: the BUDGET_USD cap: it would '
                           'cost $0.')
    assert 'the last evaluation took' in note and 'the checkpoint at step 4 is kept' in note
    assert not any(k.startswith('eval/') for k in result.history[-1])
    line = summary.line(result)
    assert f'(ran 4 steps from step 0); {"; ".join(result.notes)}; cost $' in line
    ledger = Ledger(tmp_path / 'run')
    s = ledger.stage_summary('run', 'train')
    assert ledger.spent_usd('run') <= cost.budget_usd, s
    assert s.end_reason == result.reason and s.eval_usd > 0 and s.compile_usd > 0
    ckpt = RunCheckpointer(str(tmp_path / 'run'))
    assert ckpt.latest_step() == 4
    ckpt.close()
