"""Cost accounting: the paper's quoted prices, price tables, the ledger's resume model, report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from doa_jax.callbacks import TrainPlan
from doa_jax.cost import (BudgetExceededError, ComputeMeter, CostCallback, Ledger, LedgerError,
                          PriceError, annotation_cost_usd, check_budget, default_prices,
                          device_cost_usd, estimate_from_benchmark, estimate_from_flops,
                          estimate_from_warmup, llm_cost_usd, load_prices)
from doa_jax.cost.prices import format_usd
from doa_jax.cost.report import collect, format_table, main as report_main


def fake_mesh(kind: str = 'NVIDIA A100-SXM4-40GB', n: int = 4):
    devices = np.array([types.SimpleNamespace(device_kind=kind) for _ in range(n)], dtype=object)
    return types.SimpleNamespace(devices=devices.reshape(n, 1))


# ---- the paper's numbers ----------------------------------------------------------------------
@pytest.mark.parametrize('task,n,usd', [
    ('WLP', 1_000, 260), ('WLP', 5_000, 1_300), ('Stanceosaurus', 5_000, 1_820),
    ('FEVER', 5_000, 645), ('MultiPIT_id', 5_000, 1_000), ('MultiPIT_gen', 10_000, 3_710),
    ('NQ', 10_000, 1_290), ('natural_questions', 10_000, 1_290)])
def test_paper_annotation_costs_are_exact(task, n, usd):
    assert annotation_cost_usd(task, n) == usd     # exact, not approximately


def test_paper_a100_hour_prices_are_exact():
    prices = default_prices()
    rate = prices.usd_per_device_hour('NVIDIA A100-SXM4-40GB')
    assert device_cost_usd(3600, 1, rate) == 1.875
    assert device_cost_usd(2 * 3600, 4, rate) == 15.0


# ---- price table ------------------------------------------------------------------------------
@pytest.mark.parametrize('kind,entry', [
    ('NVIDIA A100-SXM4-40GB', 'A100'), ('NVIDIA A100 80GB PCIe', 'A100 80GB'),
    ('NVIDIA H100 80GB HBM3', 'H100'), ('NVIDIA H200', 'H200'), ('TPU v4', 'TPU v4'),
    ('TPU v5 lite', 'TPU v5e'), ('TPU v5e', 'TPU v5e'), ('TPU v5', 'TPU v5p'),
    ('TPU v6 lite', 'TPU v6e'), ('cpu', 'CPU'), ('Tesla V100-SXM2-16GB', 'V100')])
def test_device_kind_matching(kind, entry):
    assert default_prices().device_price(kind).name == entry


def test_unknown_device_is_a_clear_error_or_an_explicit_fallback():
    prices = default_prices()
    with pytest.raises(PriceError, match=r"'Quantum QPU-9'.*fallback"):
        prices.device_price('Quantum QPU-9')
    assert prices.device_price('Quantum QPU-9', fallback='A100').name == 'A100'
    with pytest.raises(PriceError, match='not in the price table'):
        prices.device_price('Quantum QPU-9', fallback='nope')


def test_every_default_entry_names_its_source():
    prices = default_prices()
    for d in prices.devices:
        assert d.source, d.name
        assert d.name == 'A100' or d.source.startswith('assumption'), d.name
    assert all(p.source.startswith('assumption') for p in prices.llm.values())


def test_yaml_and_python_overrides(tmp_path):
    f = tmp_path / 'prices.yaml'
    f.write_text('devices:\n  A100: {usd_per_hour: 2.5}\n'
                 '  MyChip: {usd_per_hour: 0.5, aliases: ["\\\\bmychip\\\\b"]}\n'
                 'annotation:\n  my_task: {usd_per_label: 0.05}\n'
                 'llm:\n  my-llm: {usd_per_1k_input: 0.001, usd_per_1k_output: 0.002}\n')
    prices = load_prices(f)
    assert prices.usd_per_device_hour('NVIDIA A100-SXM4-40GB') == 2.5
    assert prices.device_price('ACME MyChip rev2').name == 'MyChip'
    assert prices.usd_per_device_hour('TPU v4') == default_prices().usd_per_device_hour('TPU v4')
    assert annotation_cost_usd('My Task', 1000, prices) == 50
    assert llm_cost_usd('my-llm', 2000, 500, prices) == 0.003
    py = default_prices().with_overrides(devices={'H100': 3}, annotation={'fever': 0.1})
    assert py.usd_per_device_hour('NVIDIA H100 80GB HBM3') == 3
    assert annotation_cost_usd('fever', 10, py) == 1
    bad = tmp_path / 'bad.yaml'
    bad.write_text('devices:\n  A100: {usd_per_hour: cheap}\n')
    with pytest.raises(PriceError, match=r'bad.yaml: devices.A100.usd_per_hour'):
        load_prices(bad)
    with pytest.raises(PriceError, match='does not exist'):
        load_prices(tmp_path / 'missing.yaml')
    with pytest.raises(PriceError, match='No annotation price.*with_overrides'):
        annotation_cost_usd('unknown_task', 1)


# ---- ledger -----------------------------------------------------------------------------------
A100 = 'NVIDIA A100-SXM4-40GB'


def test_ledger_resume_counts_each_step_once_and_keeps_redone_money(tmp_path):
    led = Ledger(tmp_path)
    a1 = led.begin_attempt('r', 'train', 0)
    for first in (1, 5, 9):                           # 4 steps of 1 h each on one A100
        led.record_steps('r', 'train', a1, first, first + 3, 4 * 3600.0, A100, 1, 1.875)
    led.record_checkpoint('r', 'train', a1, 6)        # checkpoint inside [5, 8]
    assert led.record_steps('r', 'train', a1, 9, 12, 4 * 3600.0, A100, 1, 1.875) is False
    with pytest.raises(LedgerError, match='overlaps'):
        led.record_steps('r', 'train', a1, 10, 11, 3600.0, A100, 1, 1.875)
    a2 = led.begin_attempt('r', 'train', 6)           # crash; resume from checkpoint 6
    led.record_steps('r', 'train', a2, 7, 12, 6 * 3600.0, A100, 1, 1.875)
    led.end_attempt('r', 'train', a2, 12, 'done')
    assert [(f, l) for f, l, _ in led.counted_step_intervals('r', 'train')] == \
        [(1, 4), (5, 6), (7, 12)]
    s = led.stage_summary('r', 'train')
    assert s.step_usd == 12 * 1.875 and s.step_seconds == 12 * 3600
    assert s.redone_usd == 6 * 1.875                  # steps 7..12 of the first attempt
    assert s.total_usd == led.spent_usd('r') == 18 * 1.875
    assert s.pending_usd == 0 and s.attempts == 2 and s.end_reason == 'done'


def test_pending_money_is_above_the_last_checkpoint(tmp_path):
    led = Ledger(tmp_path / 'ledger.sqlite')
    a = led.begin_attempt('r', 'train', 0)
    led.record_steps('r', 'train', a, 1, 10, 3600.0, A100, 2, 1.875)
    led.record_checkpoint('r', 'train', a, 4)
    assert led.stage_summary('r', 'train').pending_usd == pytest.approx(6 / 10 * 2 * 1.875)


def test_labels_llm_and_compute_are_idempotent_per_range(tmp_path):
    led = Ledger(tmp_path)
    prices = default_prices()
    assert led.record_labels('s', 'annotate', 'fever', 0, 4999, prices.usd_per_label('fever'))
    assert not led.record_labels('s', 'annotate', 'fever', 0, 4999, prices.usd_per_label('fever'))
    with pytest.raises(LedgerError, match='count money twice'):
        led.record_labels('s', 'annotate', 'fever', 4000, 5999, prices.usd_per_label('fever'))
    led.record_llm('s', 'gpt', 'gpt-4o', 0, 9, 1000, 1000, llm_cost_usd('gpt-4o', 1000, 1000))
    with ComputeMeter(led, prices, 's', 'pseudo_label', 0, 99, mesh=fake_mesh('TPU v4', 8),
                      write=True) as m:
        pass
    s = {x.stage: x for x in led.summary()}
    assert s['annotate'].labels == 5000 and s['annotate'].total_usd == 645
    assert s['gpt'].llm_usd == 0.0125 and s['gpt'].llm_input_tokens == 1000
    assert s['pseudo_label'].device_count == 8 and s['pseudo_label'].compute_usd == \
        pytest.approx(device_cost_usd(m.seconds, 8, 3.22))


def test_callback_records_overheads_and_excludes_them_when_asked(tmp_path):
    led = Ledger(tmp_path)
    cb = CostCallback(led, default_prices(), 'r', 'train', include_compile=False,
                      include_other=False, write=True)      # fake durations: no real gaps
    cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
    cb.on_compile(seconds=3600.0)
    cb.on_steps_end(first_step=1, last_step=10, seconds=1800.0)
    cb.on_eval_end(step=10, seconds=900.0)
    cb.on_checkpoint(step=10)
    cb.on_train_end(step=10, reason='done')
    s = led.stage_summary('r', 'train')
    assert (s.compile_seconds, s.compile_usd) == (3600.0, 0.0)
    assert s.step_usd == 3.75 and s.eval_usd == 1.875 and s.total_usd == 5.625
    assert s.device_hours == 3.0 and s.device_kind == A100 and s.device_count == 4


def test_callback_bills_unreported_wall_clock_as_other(tmp_path):
    led = Ledger(tmp_path)
    cb = CostCallback(led, default_prices(), 'r', 'train', write=True)
    cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
    time.sleep(0.05)                                  # e.g. a checkpoint save: no hook times it
    cb.on_checkpoint(step=0)
    cb.on_train_end(step=0, reason='done')
    s = led.stage_summary('r', 'train')
    assert 0.05 <= s.other_seconds < 5
    assert s.other_usd == pytest.approx(device_cost_usd(s.other_seconds, 4, 1.875))
    assert s.total_usd == s.other_usd == led.spent_usd('r')


def test_callback_requires_a_priced_device(tmp_path):
    cb = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', write=True)
    with pytest.raises(PriceError, match='Mystery'):
        cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh('Mystery X1'))


def test_budget_scope_ledger_counts_other_runs(tmp_path):
    led = Ledger(tmp_path)
    led.record_labels('labels', 'annotate', 'wlp', 0, 999, 0.26)         # $260 already spent
    cb = CostCallback(led, default_prices(), 'r', 'train', budget_usd=261.0,
                      budget_scope='study', write=True)
    cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
    cb.on_steps_end(first_step=1, last_step=1, seconds=3600.0)           # + $7.50
    assert cb.should_stop(step=1) and cb.stopped_at == 1
    own = CostCallback(led, default_prices(), 'r2', 'train', budget_usd=261.0, write=True)
    own.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
    assert not own.should_stop(step=0)


# ---- pre-flight -------------------------------------------------------------------------------
def test_preflight_refuses_over_budget_unless_forced():
    est = estimate_from_warmup([30.0, 1.0, 1.2, 0.8], steps=7200, device_count=4,
                               usd_per_device_hour=1.875)
    assert est.seconds_per_step == 1.0 and est.usd == 15.0
    with pytest.raises(BudgetExceededError) as e:
        check_budget(est, budget_usd=20.0, spent_usd=10.0)
    msg = str(e.value)
    assert '$15.00' in msg and '$10.00' in msg and 'CostCallback.force=True' in msg
    assert check_budget(est, 20.0, 10.0, force=True) == -5.0
    assert check_budget(est, 20.0, 5.0) == 0.0
    bench = estimate_from_benchmark({'timing/seqs_per_second': 64.0, 'name': 'xxl'}, steps=3600,
                                    batch_size=32, device_count=4, usd_per_device_hour=1.875)
    assert bench.usd == 3.75 and 'xxl' in bench.describe()


def test_callback_preflight_from_warmup_or_given_speed(tmp_path):
    def start(**kw):
        cb = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', budget_usd=5.0,
                          planned_steps=1000, write=True, **kw)
        cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
        return cb

    cb = start()
    # Warm-up: 3.6 s/step -> 990 more steps on 4 A100s = $7.425 > $5 - $0.075 spent.
    with pytest.raises(BudgetExceededError,
                       match=r'\$7\.42.*remaining budget \$4\.9\d.*force=True'):
        cb.on_steps_end(first_step=1, last_step=10, seconds=36.0)
    start(force=True).on_steps_end(first_step=11, last_step=20, seconds=36.0)   # forced: runs
    with pytest.raises(BudgetExceededError, match='seconds_per_step'):
        start(seconds_per_step=3.6)                    # e.g. from a benchmark table: no warm-up
    start(seconds_per_step=1.0).on_steps_end(first_step=21, last_step=30, seconds=10.0)


@pytest.mark.parametrize('usd,text', [
    (0.0, '$0'), (-0.0, '$0'), (0.0000891, '$0.0000891'), (0.00448, '$0.00448'),
    (0.0999999, '$0.100'), (0.4, '$0.400'), (7.425, '$7.42'), (1980, '$1,980'),
    (-0.0000123, '-$0.0000123'), (9.78e-7, '$0.000000978')])
def test_money_has_three_significant_digits_below_a_dollar_and_no_negative_zero(usd, text):
    assert format_usd(usd) == text


def test_lowest_cost_and_an_exhausted_budget_read_plainly():
    # 100 steps of 3.12e12 FLOPs on 4 A100s (312 TFLOP/s each): 2.5 ms a step at best,
    # 0.25 s x 4 devices x $1.875/h = $0.000520833.
    lowest = estimate_from_flops(3.12e12, 100, 4, 312e12, 1.875)
    assert lowest.seconds_per_step == pytest.approx(0.0025) and lowest.usd == pytest.approx(
        0.25 * 4 * 1.875 / 3600)
    with pytest.raises(BudgetExceededError) as e:
        check_budget(lowest, budget_usd=0.0005, spent_usd=0.0001)
    msg = str(e.value)
    assert msg.startswith('Refusing to start: its lowest possible cost $0.000521 = ')
    assert 'the remaining budget $0.000400 (BUDGET_USD $0.000500 - already spent $0.000100)' \
        in msg and 'Lower TRAIN_STEPS, BATCH_SIZE or the model' in msg
    with pytest.raises(BudgetExceededError) as e:            # spent past the cap already
        check_budget(lowest, budget_usd=0.00001, spent_usd=0.0000133)
    assert ('the remaining budget, none (BUDGET_USD $0.0000100, already spent $0.0000133)'
            in str(e.value)) and '$-' not in str(e.value) and '-$' not in str(e.value)


def test_callback_refuses_before_recording_when_the_flops_cannot_fit(tmp_path):
    def start(budget, **kw):
        cb = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', budget_usd=budget,
                          planned_steps=1000, write=True, **kw)
        cb.on_plan(plan=TrainPlan(train_steps=1000, flops_per_step=3.12e14, eval_flops=0,
                                  peak_flops_per_device=None))     # the A100 catalog peak
        cb.on_train_start(model_dir=str(tmp_path), start_step=400, mesh=fake_mesh(n=4))
        return cb

    # 600 steps left x 3.12e14 FLOPs / (4 x 312e12 FLOP/s) = 150 s on 4 A100s: $0.3125.
    with pytest.raises(BudgetExceededError, match=r'lowest possible cost \$0\.312 = 0\.25 '
                       r's/step x 600 steps x 4 device\(s\).*remaining budget \$0\.300 '):
        start(0.30)
    assert Ledger(tmp_path).runs() == []              # no attempt recorded for a refused run
    start(0.30, force=True)                           # forced: it runs (and stops at the cap)
    assert start(0.32).attempt == 2


def test_an_evaluation_is_skipped_when_its_estimate_does_not_fit(tmp_path):
    cb = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', budget_usd=0.2,
                      include_other=False, write=True)
    cb.on_plan(plan=TrainPlan(train_steps=100, flops_per_step=1.248e14, eval_flops=1.248e15,
                              peak_flops_per_device=None))
    cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
    # Before any step: the eval's 1.248e15 FLOPs at the peak 4 x 312e12 FLOP/s take 1 s on 4
    # devices: $0.00208, which fits.
    assert cb.skip_eval(step=0, final=False) is None
    # 10 steps in 40 s: 3.12e13 FLOP/s measured, so the eval takes 40 s: 160 device-seconds =
    # $0.0833; $0.0833 is spent, $0.1167 left: it fits. With a cap of $0.15 it would not.
    cb.on_steps_end(first_step=1, last_step=10, seconds=40.0)
    assert cb.skip_eval(step=10, final=False) is None
    cb.budget_usd = 0.15
    why = cb.skip_eval(step=10, final=False)
    assert why.startswith('the BUDGET_USD cap: it would cost $0.0833 (at least 1.25e+15 FLOPs '
                          "at 3.12e+13 FLOP/s, the training steps' measured FLOP/s), more than "
                          'the remaining budget $0.0667 (BUDGET_USD $0.150 - already spent '
                          '$0.0833)')
    assert cb.stopped_at == 10
    # Once an evaluation ran, its measured time is the estimate: 100 s on 4 devices = $0.208.
    cb.budget_usd = 1.0
    cb.on_eval_end(step=10, seconds=100.0)              # spent: $0.0833 + $0.208 = $0.292
    assert cb.skip_eval(step=20, final=False) is None   # $0.708 left
    cb.budget_usd = 0.45
    assert 'it would cost $0.208 (the last evaluation took 100 s)' in cb.skip_eval(
        step=20, final=True)
    cb.include_eval = False                             # an unbilled evaluation always runs
    assert cb.skip_eval(step=20, final=True) is None


def test_a_stop_check_looks_ahead_to_the_next_check_and_the_final_save(tmp_path):
    """On a simulated clock, 4 A100s at $1.875/device-hour: 480 s cost $1.00. Checks at every
    10 steps, an evaluation every 20."""
    now = [0.0]
    cb = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', budget_usd=3.90,
                      include_compile=False, write=True, clock=lambda: now[0])
    cb.on_plan(plan=TrainPlan(train_steps=100, flops_per_step=1.248e14, eval_flops=3.12e14,
                              peak_flops_per_device=None, log_period=10, eval_period=20))
    cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh(n=4))
    now[0] = 148.0                          # 48 s of start-up (billed, once), 100 s compiling
    cb.on_compile(seconds=100.0)
    now[0] += 480 + 48                      # steps 1-10 in 480 s, 48 s of host time
    cb.on_steps_end(first_step=1, last_step=10, seconds=480.0)
    # $1.20 spent + $1.00 (10 steps) + $0.100 (48 s of host time) + $0.100 (the save) fits.
    assert not cb.should_stop(step=10)
    now[0] += 480 + 96                      # steps 11-20; 96 s of host time (a save's copy)
    cb.on_steps_end(first_step=11, last_step=20, seconds=480.0)
    # $2.40 spent; the evaluation due now, its FLOPs at the steps' 2.6e12 FLOP/s (120 s), the
    # next 10 steps, 96 s of host time and as much for the final save: $4.05. Without the
    # evaluation, $3.80 would have fitted the $3.90 cap.
    assert cb.should_stop(step=20) and cb.stopped_at == 20
    assert cb.stop_reason == (
        'the BUDGET_USD cap: spent $2.40 + $0.250 for the evaluation due at step 20 (at least '
        "3.12e+14 FLOPs at 2.6e+12 FLOP/s, the training steps' measured FLOP/s) + $1.00 for the "
        'next 10 step(s) (48 s/step, measured over the last 10) + $0.200 for host time between '
        'checks (96 s, as in the last stretch) + $0.200 for the final checkpoint save (96 s '
        'reserved, the longest host time measured between checks) = $4.05, more than '
        'BUDGET_USD $3.90; the checkpoint at step 20 is saved')
    now[0] += 96                            # the final save, as long as the reserve
    cb.on_checkpoint(step=20)
    cb.on_train_end(step=20, reason='stopped')
    assert Ledger(tmp_path).spent_usd('r') == pytest.approx(2.60) and cb.forecast(100) is None


def test_t5x_cost_action_stops_before_the_next_stretch_could_pass_the_cap(tmp_path):
    """t5x's CostAction on a simulated clock: 2 devices at $3.60/device-hour ($0.001/device-s).
    Each call is t5x's: train_state.step and its metrics for the stretch of steps just run."""
    from doa_jax.cost.meter import DeviceInfo
    from doa_jax.cost.t5x_action import CostAction
    (tmp_path / 'prices.yaml').write_text('devices:\n  test chip:\n    usd_per_hour: 3.6\n')
    clock = [0.0]

    def action(**kw):
        clock[0] = 0.0
        return CostAction(str(tmp_path / 'run'), prices=str(tmp_path / 'prices.yaml'),
                          devices=DeviceInfo('test chip', 2), clock=lambda: clock[0], **kw)

    def stretch(cost_action, now, step, seconds):
        clock[0] = now
        metrics = {'timing/seconds': seconds, 'timing/steps_per_second': 0.5}
        return cost_action.run(types.SimpleNamespace(step=step), {'train': metrics})

    capped = action(budget_usd=0.35)
    # 10 steps in 20 s of a 100 s stretch (start-up, compiling: once): $0.200 spent; ahead, 10
    # more steps at 2 s/step, $0.0400: $0.240.
    assert stretch(capped, 100, 10, 20) is False and capped.spent_usd() == pytest.approx(0.2)
    # 20 s of steps and 5 s of host time: $0.250 spent; ahead, $0.0400 of steps, $0.0100 of
    # host time and $0.0100 for the final save (5 s, the longest host time): $0.310.
    assert stretch(capped, 125, 20, 20) is False
    # The same again: $0.300 spent and $0.360 ahead, more than $0.35: it stops now, not once
    # the next stretch had taken the ledger to $0.350 and t5x's final save past the cap.
    assert stretch(capped, 150, 30, 20) is True and capped.stopped_at == 30
    assert capped.spent_usd() == pytest.approx(0.3)
    assert capped.stop_reason == (
        'the BUDGET_USD cap: spent $0.300 + $0.0400 for the next 10 step(s) (2 s/step, measured '
        'over the last 10) + $0.0100 for host time between checks (5 s, as in the last stretch) '
        '+ $0.0100 for the final checkpoint save (5 s reserved, the longest host time measured '
        'between checks) = $0.360, more than BUDGET_USD $0.350')
    s = Ledger(tmp_path / 'run').stage_summary('run', 'train')
    assert (s.last_step, s.end_reason) == (30, 'stopped')
    assert s.step_usd == pytest.approx(0.12) and s.other_usd == pytest.approx(0.18)
    # Near TRAIN_STEPS only the steps left are ahead: at step 30 of 35, 5 steps ($0.0200), so
    # $0.340 in all fits a $0.345 cap; at step 35 nothing is ahead.
    to_35 = action(budget_usd=0.345, planned_steps=35, run_id='to_35')
    for now, step in ((100, 10), (125, 20), (150, 30)):
        assert stretch(to_35, now, step, 20) is False
    assert to_35.forecast(30).total_usd == pytest.approx(0.34)
    assert stretch(to_35, 165, 35, 10) is False and to_35.forecast(35) is None
    assert Ledger(tmp_path / 'run').stage_summary('to_35', 'train').end_reason == 'done'


# ---- report -----------------------------------------------------------------------------------
def test_report_table_and_json(tmp_path, capsys):
    led = Ledger(tmp_path / 'teacher')
    a = led.begin_attempt('teacher', 'train', 0)
    led.record_steps('teacher', 'train', a, 1, 100, 7200.0, A100, 4, 1.875)
    led.end_attempt('teacher', 'train', a, 100, 'done')
    Ledger(tmp_path / 'labels').record_labels('gold', 'annotate', 'wlp', 0, 999, 0.26)
    rep = collect(str(tmp_path))
    assert len(rep['ledgers']) == 2 and rep['totals']['total_usd'] == 275.0
    assert report_main(['report', str(tmp_path), '--json']) == 0
    assert json.loads(capsys.readouterr().out)['totals']['device_hours'] == 8.0
    table = format_table(rep)
    assert 'teacher' in table and '4 x NVIDIA A100-SXM4-40GB' in table and '275.00' in table
    out = subprocess.run([sys.executable, '-m', 'doa_jax.cost', 'report', str(tmp_path / 'x')],
                         capture_output=True, text=True)
    assert out.returncode == 2 and 'no cost ledger' in out.stderr
