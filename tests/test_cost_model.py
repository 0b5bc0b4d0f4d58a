"""The study's compute cost model: FLOPs at a stated nominal throughput, or measured wall clock."""

from __future__ import annotations

import pytest

from doa_jax import flops
from doa_jax.cost import PriceError, default_prices
from doa_jax.cost.cost_model import ComputeCostModel
from doa_jax.models.config import get_config

QUICKSTART_LENGTHS = {'inputs': 72, 'targets': 88}


def test_default_utilisations_reproduce_the_quickstart_wall_clock_costs():
    """The docstring's calibration: on the CPU entry, the quickstart's mini teacher (300 steps at
    batch 16) cost about $0.002 and labeling its 1,536-example pool about $0.0003 of wall clock
    on the quiet reference machine."""
    model, prices, mini = ComputeCostModel(device_kind='cpu'), default_prices(), \
        get_config('t5_1_1_mini')
    teacher = model.train_usd(prices, mini, 300, 16, QUICKSTART_LENGTHS)
    pool = model.decode_usd(prices, mini, 1536, 72, 87)
    assert teacher == pytest.approx(0.002, rel=0.1)
    assert pool == pytest.approx(0.0003, rel=0.1)


def test_flops_prices_scale_with_work_and_device():
    prices, tiny = default_prices(), get_config('t5_1_1_tiny')
    cpu = ComputeCostModel(device_kind='cpu')
    one = cpu.train_usd(prices, tiny, 10, 16, QUICKSTART_LENGTHS)
    assert cpu.train_usd(prices, tiny, 20, 16, QUICKSTART_LENGTHS) == pytest.approx(2 * one)
    assert cpu.train_usd(prices, tiny, 10, 32, QUICKSTART_LENGTHS) == pytest.approx(2 * one)
    slower = ComputeCostModel(device_kind='cpu', train_utilization=0.075)
    assert slower.train_usd(prices, tiny, 10, 16, QUICKSTART_LENGTHS) == pytest.approx(2 * one)
    # An online KD teacher adds its forward pass: a third of its training FLOPs per sequence.
    mini = get_config('t5_1_1_mini')
    with_teacher = cpu.train_usd(prices, tiny, 10, 16, QUICKSTART_LENGTHS, mini)
    assert with_teacher - one == pytest.approx(cpu.train_usd(prices, mini, 10, 16,
                                                             QUICKSTART_LENGTHS) / 3)
    # Another device kind: its own $/hour over its own peak.
    a100 = ComputeCostModel(device_kind='NVIDIA A100-SXM4-40GB')
    ratio = a100.train_usd(prices, tiny, 10, 16, QUICKSTART_LENGTHS) / one
    per_flop = lambda kind: float(prices.usd_per_device_hour(kind)) / prices.peak_flops(kind)
    assert ratio == pytest.approx(per_flop('A100') / per_flop('cpu'))


def test_decode_flops_are_a_forward_pass():
    """Greedy decoding with a cache does the forward work of training on the decoded sequence."""
    small = get_config('t5_1_1_small')
    decode = flops.decode_flops_per_sequence(small, 256, 64)
    assert decode == pytest.approx(flops.train_flops_per_sequence(small, 256, 64) / 3, rel=1e-3)


def test_bad_cost_models_say_how_to_fix():
    with pytest.raises(ValueError, match="'flops' or 'measured'"):
        ComputeCostModel(kind='wallclock')
    with pytest.raises(ValueError, match='train_utilization'):
        ComputeCostModel(train_utilization=1.5)
    prices = default_prices().with_overrides(devices={'Mystery chip': {'usd_per_hour': 1.0}})
    with pytest.raises(PriceError, match="peak_bf16_tflops.*'measured'"):
        ComputeCostModel(device_kind='Mystery chip').train_usd(
                prices, get_config('t5_1_1_tiny'), 1, 1, QUICKSTART_LENGTHS)
    assert 'wall-clock' in ComputeCostModel(kind='measured').describe(prices)
    assert "'cpu' (0.35 TFLOP/s) x 0.15" in ComputeCostModel(device_kind='cpu').describe(prices)
    with pytest.raises(PriceError, match='peak_bf16_tflops'):
        ComputeCostModel(device_kind='Mystery chip').describe(prices)
