"""The device catalog (prices.yaml `devices`): one table, one matching rule, for MFU and for $.

Fake devices stand in for accelerators: only `device_kind` and `platform` are read.
"""

from __future__ import annotations

import dataclasses
import logging
import types

import numpy as np
import pytest

from doa_jax import flops
from doa_jax.cost import CostCallback, Ledger, PriceError, default_prices, load_prices


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    device_kind: str
    platform: str = 'gpu'


def fake_mesh(kind: str, n: int = 2):
    devices = np.array([FakeDevice(kind) for _ in range(n)], dtype=object).reshape(n, 1)
    return types.SimpleNamespace(devices=devices, size=n)


# jax's (or torch's) device_kind strings as real machines report them -> entry, dense bf16 TFLOP/s.
REAL_KINDS = [
    ('NVIDIA A100-SXM4-40GB', 'gpu', 'A100', 312),
    ('NVIDIA A100-SXM4-80GB', 'gpu', 'A100 80GB', 312),
    ('NVIDIA A100-PCIE-40GB', 'gpu', 'A100', 312),
    ('NVIDIA A100 80GB PCIe', 'gpu', 'A100 80GB', 312),
    ('NVIDIA H100 80GB HBM3', 'gpu', 'H100', 989), ('NVIDIA H100 PCIe', 'gpu', 'H100 PCIe', 756),
    ('NVIDIA H100 NVL', 'gpu', 'H100 NVL', 835), ('NVIDIA H200', 'gpu', 'H200', 989),
    ('NVIDIA H200 NVL', 'gpu', 'H200 NVL', 835), ('NVIDIA B200', 'gpu', 'B200', 2250),
    ('NVIDIA L4', 'gpu', 'L4', 121), ('NVIDIA L40S', 'gpu', 'L40S', 362),
    ('NVIDIA A10G', 'gpu', 'A10G', 70), ('Tesla V100-SXM2-16GB', 'gpu', 'V100', 125),
    ('Tesla V100-PCIE-32GB', 'gpu', 'V100 PCIe', 112),
    ('TPU v2', 'tpu', 'TPU v2', 22.5), ('TPU v3', 'tpu', 'TPU v3', 61.5),
    ('TPU v4', 'tpu', 'TPU v4', 275), ('TPU v5 lite', 'tpu', 'TPU v5e', 197),
    ('TPU v5e', 'tpu', 'TPU v5e', 197), ('TPU v5p', 'tpu', 'TPU v5p', 459),
    ('TPU v5', 'tpu', 'TPU v5p', 459), ('TPU v6 lite', 'tpu', 'TPU v6e', 918),
    ('TPU v6e', 'tpu', 'TPU v6e', 918),
]


@pytest.mark.parametrize('kind,platform,entry,tflops', REAL_KINDS)
def test_real_device_kinds_find_their_peak_and_their_price(kind, platform, entry, tflops):
    table = default_prices()
    assert table.match_device(kind).name == entry
    assert flops.peak_flops_per_device(FakeDevice(kind, platform)) == pytest.approx(tflops * 1e12)
    # The cost meter reads the same entry: one matching rule for both.
    assert table.device_price(kind).name == entry
    assert table.usd_per_device_hour(kind) > 0


def test_cpu_peak_is_the_catalogs_unless_overridden():
    cpu = FakeDevice('cpu', 'cpu')
    assert default_prices().match_device('cpu').name == 'CPU'
    assert flops.peak_flops_per_device(cpu) == flops.DEFAULT_CPU_PEAK_FLOPS
    assert flops.DEFAULT_CPU_PEAK_FLOPS == default_prices().peak_flops('cpu') > 0
    assert flops.peak_flops_per_device(cpu, cpu_peak=2e12) == 2e12


@pytest.mark.parametrize('kind', ['NVIDIA L40', 'NVIDIA A10', 'TPU v4 lite', 'NVIDIA GH200 480GB',
                                  'Tesla V100S-PCIE-32GB'])
def test_near_misses_match_no_entry(kind):
    """Word boundaries: an L40 is not an L4, an A10 not an A100 or A10G, v4i not v4."""
    assert default_prices().match_device(kind) is None


@pytest.mark.parametrize('kind,gb', [
    ('NVIDIA A100-SXM4-80GB', 80), ('NVIDIA A100-SXM4-40GB', 40), ('A100-80GB', 80),
    ('A100-40GB', 40), ('NVIDIA H100 80GB HBM3', 80), ('TPU v5 lite', 16), ('TPU v3', 16)])
def test_memory_per_device_for_the_memory_gate(kind, gb):
    """The recipe headers (`# target: 4x A100-80GB`) name kinds the same rule matches."""
    assert default_prices().memory_bytes(kind) == gb * 1e9


def test_every_entry_has_both_figures_and_their_sources():
    for d in default_prices().devices:
        assert d.usd_per_hour is not None and d.source, d.name
        assert d.peak_bf16_flops and d.peak_bf16_flops > 0 and d.flops_source, d.name


def test_unknown_device_warns_once_and_mfu_is_unknown(monkeypatch, caplog):
    monkeypatch.setattr(flops, '_warned_kinds', set())
    qpu = FakeDevice('Quantum QPU-9', 'gpu')
    with caplog.at_level(logging.WARNING, logger=flops.__name__):
        peaks = [flops.peak_flops_per_device(qpu) for _ in range(3)]
        flops.peak_flops_per_device(FakeDevice('NVIDIA H100 80GB HBM3'))
    assert peaks == [None, None, None]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'Quantum QPU-9'" in warnings[0] and 'doa_jax/cost/prices.yaml' in warnings[0]
    assert flops.mfu(1e12, 1.0, 2, None) is None
    assert flops.mfu(1e12, 1.0, 2, 1e12) == 0.5


def test_trainer_leaves_mfu_out_when_the_peak_is_unknown():
    from doa_jax import trainer
    from doa_jax.train_step import METRIC_KEYS

    host = {k: np.float32(2.0) for k in METRIC_KEYS}
    mesh = types.SimpleNamespace(size=2)
    known = trainer._interval_scalars(host, 1.0, 8, 4e12, 1e12, mesh)
    unknown = trainer._interval_scalars(host, 1.0, 8, 4e12, None, mesh)
    assert known['timing/mfu'] == pytest.approx(4e12 * 2 / (2 * 1e12))
    assert 'timing/mfu' not in unknown
    assert {k: v for k, v in known.items() if k != 'timing/mfu'} == unknown


def test_unpriced_device_stops_the_cost_callback_with_the_fix(tmp_path):
    cb = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', write=True)
    with pytest.raises(PriceError) as e:
        cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh('Quantum QPU-9'))
    msg = str(e.value)
    assert "2 x 'Quantum QPU-9'" in msg and 'before step 0' in msg
    assert 'doa_jax/cost/prices.yaml' in msg and 'usd_per_hour' in msg
    assert '--gin.CostCallback.prices=' in msg and '--gin.CostCallback.device_price_fallback=' in msg
    ok = CostCallback(Ledger(tmp_path), default_prices(), 'r', 'train', write=True,
                      device_price_fallback='A100')
    ok.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh('Quantum QPU-9'))
    assert ok.usd_per_device_hour == default_prices().usd_per_device_hour('A100')


def test_an_entry_may_know_its_peak_but_not_its_price(tmp_path):
    f = tmp_path / 'chips.yaml'
    f.write_text('devices:\n  QPU:\n    peak_bf16_tflops: 100\n    aliases: ["\\\\bqpu\\\\b"]\n')
    table = load_prices(f)
    assert flops.peak_flops_per_device(FakeDevice('Quantum QPU-9'), catalog=table) == 1e14
    cb = CostCallback(Ledger(tmp_path), table, 'r', 'train', write=True)
    with pytest.raises(PriceError, match=r"entry 'QPU' in .*chips.yaml has no usd_per_hour.*"
                                         r'devices: \{"QPU": \{usd_per_hour'):
        cb.on_train_start(model_dir=str(tmp_path), start_step=0, mesh=fake_mesh('Quantum QPU-9'))


def test_overriding_a_price_keeps_the_peak_and_vice_versa(tmp_path):
    f = tmp_path / 'mine.yaml'
    f.write_text('devices:\n  H100: {usd_per_hour: 3}\n  L4: {peak_bf16_tflops: 100}\n')
    table = load_prices(f)
    h100, l4 = table.match_device('NVIDIA H100 80GB HBM3'), table.match_device('NVIDIA L4')
    assert (h100.usd_per_hour, h100.peak_bf16_flops) == (3, 989e12)
    assert (l4.usd_per_hour, l4.peak_bf16_flops) == (default_prices().usd_per_device_hour('L4'),
                                                     100e12)


@pytest.mark.parametrize('yaml_text,where,key,hint', [
    ('devices:\n  CPU: {usd_per_hr: 0.10}\n', 'devices.CPU', 'usd_per_hr', 'usd_per_hour'),
    ('devices:\n  MyChip: {usd_per_hour: 1, alias: ["mychip"]}\n', 'devices.MyChip', 'alias',
     'aliases'),
    ('annotation:\n  wlp: {usd_per_lable: 0.3}\n', 'annotation.wlp', 'usd_per_lable',
     'usd_per_label'),
    ('llm:\n  m: {usd_per_1k_input: 1, usd_per_1k_output: 2, aliases: [x]}\n', 'llm.m', 'aliases',
     None),
    ('device:\n  CPU: {usd_per_hour: 0.1}\n', 'top level', 'device', 'devices'),
])
def test_unknown_yaml_keys_fail_with_file_key_and_valid_keys(tmp_path, yaml_text, where, key,
                                                              hint):
    f = tmp_path / 'my_prices.yaml'
    f.write_text(yaml_text)
    with pytest.raises(PriceError) as e:
        load_prices(f)
    msg = str(e.value)
    assert str(f) in msg and where in msg and f"unknown key(s) '{key}'" in msg
    assert 'valid keys: ' in msg
    if hint:
        assert f"'{key}' -> '{hint}'?" in msg and hint in msg.split('valid keys: ')[1]
    # The same check guards a gin-bound price file, before any training.
    with pytest.raises(PriceError, match=key):
        CostCallback(prices=str(f))


def test_python_overrides_are_checked_like_yaml():
    with pytest.raises(PriceError, match=r"<python overrides>: devices.H100: unknown key\(s\) "
                                         r"'usd_per_hr'"):
        default_prices().with_overrides(devices={'H100': {'usd_per_hr': 3}})
    assert default_prices().with_overrides(devices={'H100': 3}).usd_per_device_hour('H100') == 3
