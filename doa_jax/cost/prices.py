"""Price tables: $ per device-hour, $ per gold label, $ per 1K LLM tokens; the device catalog.

The `devices` section of prices.yaml is the project's one device catalog: per device kind, its
$/device-hour and its peak dense bf16 FLOP/s, found by one matching rule (`match_device`). The cost
meter reads the price, `doa_jax.flops` the peak (for MFU).

Money is computed with `decimal.Decimal` from the table's literal figures, so the paper's quoted
costs (e.g. 5K FEVER labels x $0.129 = $645) come out exactly instead of 645.0000000000001.
The library takes tables as arguments; only entry points bind a price file through gin.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import math
import os
import re
from decimal import Decimal
from typing import Any, Mapping

import yaml

DEFAULT_PRICE_FILE = 'prices.yaml'
DEFAULT_PRICE_PATH = f'doa_jax/cost/{DEFAULT_PRICE_FILE}'
_SECONDS_PER_HOUR = Decimal(3600)
# The keys each kind of entry may have; anything else in a price file is an error (a misspelled
# `usd_per_hour` must not silently leave the default price in place).
_TOP_LEVEL_KEYS = ('devices', 'annotation', 'llm')
_DEVICE_KEYS = ('usd_per_hour', 'peak_bf16_tflops', 'memory_gb', 'aliases', 'source',
                'flops_source')
_ANNOTATION_KEYS = ('usd_per_label', 'aliases', 'source')
_LLM_KEYS = ('usd_per_1k_input', 'usd_per_1k_output', 'source')


class PriceError(ValueError):
    """A price is missing or malformed; the message says which and how to fix it."""


def to_decimal(x: Any) -> Decimal:
    """Exact decimal of a YAML/Python number: floats go through repr so 0.129 stays 0.129."""
    if isinstance(x, Decimal):
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise PriceError(f'expected a number, got {x!r} ({type(x).__name__})')
    try:
        value = Decimal(repr(x)) if isinstance(x, float) else Decimal(str(x).strip())
    except ArithmeticError:
        raise PriceError(f'expected a number, got {x!r}') from None
    if not value.is_finite():
        raise PriceError(f'expected a finite number, got {x!r}')
    return value


def normalize_device_kind(kind: str) -> str:
    """'NVIDIA A100-SXM4-40GB' -> 'a100 sxm4 40gb'; 'TPU v5 lite' -> 'tpu v5 lite'."""
    s = re.sub(r'[-_]+', ' ', kind.strip().lower())
    s = re.sub(r'^nvidia\s+', '', s)
    return re.sub(r'\s+', ' ', s)


def normalize_name(name: str) -> str:
    """Task / model keys: lower case, runs of non-alphanumerics (except '.', '-') -> '_'."""
    return re.sub(r'[^a-z0-9.\-]+', '_', name.strip().lower()).strip('_')


@dataclasses.dataclass(frozen=True)
class DeviceEntry:
    """One device kind of the catalog. Any figure may be unknown (None): an unpriced device
    cannot be metered, a device without a peak gets no MFU, one without memory no fit check."""
    name: str
    usd_per_hour: Decimal | None
    peak_bf16_flops: float | None = None    # FLOP/s per jax device, dense bf16 (YAML: TFLOP/s)
    aliases: tuple[str, ...] = ()
    source: str = ''                        # where the price comes from
    flops_source: str = ''                  # where the peak comes from
    memory_bytes: float | None = None       # memory per jax device (YAML: memory_gb, 1e9 bytes)

    def matches(self, normalised_kind: str) -> bool:
        return (normalize_device_kind(self.name) == normalised_kind
                or any(re.search(a, normalised_kind) for a in self.aliases))


@dataclasses.dataclass(frozen=True)
class LLMPrice:
    name: str
    usd_per_1k_input: Decimal
    usd_per_1k_output: Decimal
    source: str = ''


@dataclasses.dataclass(frozen=True)
class PriceTable:
    """All prices one study uses. Build with `load_prices()`; never mutate, use `with_overrides`."""

    devices: tuple[DeviceEntry, ...]           # the device catalog, in matching order
    annotation: Mapping[str, Decimal]          # normalised task name or alias -> $ per label
    llm: Mapping[str, LLMPrice]                # normalised model name -> prices
    origin: str = '<default>'

    # ---- devices ----------------------------------------------------------------------------
    def match_device(self, device_kind: str) -> DeviceEntry | None:
        """The catalog entry of a jax device kind, or None. The one matching rule: entries in
        order, the first whose name or alias matches the normalised kind wins."""
        norm = normalize_device_kind(device_kind)
        return next((entry for entry in self.devices if entry.matches(norm)), None)

    def memory_bytes(self, device_kind: str) -> float | None:
        """Memory of one device of this kind (bytes); None when the catalog lacks it."""
        entry = self.match_device(device_kind)
        return None if entry is None else entry.memory_bytes

    def peak_flops(self, device_kind: str) -> float | None:
        """Peak dense bf16 FLOP/s of one device of this kind; None when the catalog lacks it."""
        entry = self.match_device(device_kind)
        return None if entry is None else entry.peak_bf16_flops

    def device_price(self, device_kind: str, fallback: str | None = None) -> DeviceEntry:
        """Priced entry for a jax device kind; `fallback` names an entry to use when the kind has
        no entry or its entry has no price."""
        entry = self.match_device(device_kind)
        if entry is not None and entry.usd_per_hour is not None:
            return entry
        if fallback is not None:
            chosen = next((e for e in self.devices if e.name == fallback or
                           normalize_device_kind(e.name) == normalize_device_kind(fallback)), None)
            if chosen is None or chosen.usd_per_hour is None:
                why = 'is not in the price table' if chosen is None else 'has no usd_per_hour in'
                raise PriceError(f'fallback device price {fallback!r} {why} ({self.origin}); '
                                 f'priced entries: {self._priced_names()}.')
            return chosen
        norm = normalize_device_kind(device_kind)
        if entry is None:
            what, key = f'no entry of {self.origin} matches it', device_kind
        else:
            what, key = f'its entry {entry.name!r} in {self.origin} has no usd_per_hour', entry.name
        raise PriceError(
            f'No price for device kind {device_kind!r} (normalised {norm!r}): {what}. Priced '
            f'entries: {self._priced_names()}. Fix: write a price YAML shaped like '
            f'{DEFAULT_PRICE_PATH} with `devices: {{"{key}": {{usd_per_hour: <$ per '
            f'device-hour>}}}}` and pass it (training: --gin.CostCallback.prices='
            f'"\'my_prices.yaml\'"; benchmark CLIs: --prices=my_prices.yaml; Python: '
            f'load_prices("my_prices.yaml")), or price it like a known device: fallback="A100" '
            f'(training: --gin.CostCallback.device_price_fallback="\'A100\'"; benchmark CLIs: '
            f'--device_price_fallback=A100).')

    def usd_per_device_hour(self, device_kind: str, fallback: str | None = None) -> Decimal:
        return self.device_price(device_kind, fallback).usd_per_hour

    def _priced_names(self) -> str:
        return ', '.join(d.name for d in self.devices if d.usd_per_hour is not None)

    # ---- labels and tokens ------------------------------------------------------------------
    def usd_per_label(self, task: str) -> Decimal:
        key = normalize_name(task)
        if key not in self.annotation:
            raise PriceError(
                f'No annotation price for task {task!r} (key {key!r}) in {self.origin}. Known: '
                f'{", ".join(sorted(self.annotation))}. Fix: add `annotation: {{{key}: '
                f'{{usd_per_label: X}}}}` to a price YAML or call '
                f'with_overrides(annotation={{"{key}": X}}).')
        return self.annotation[key]

    def llm_price(self, model: str) -> LLMPrice:
        key = normalize_name(model)
        if key not in self.llm:
            raise PriceError(
                f'No LLM price for model {model!r} in {self.origin}. Known: '
                f'{", ".join(sorted(self.llm))}. Fix: add `llm: {{{key}: {{usd_per_1k_input: X, '
                f'usd_per_1k_output: Y}}}}` to a price YAML or call with_overrides(llm=...).')
        return self.llm[key]

    # ---- overrides --------------------------------------------------------------------------
    def with_overrides(self, devices: Mapping[str, Any] | None = None,
                       annotation: Mapping[str, Any] | None = None,
                       llm: Mapping[str, Any] | None = None,
                       origin: str = '<python overrides>') -> 'PriceTable':
        """A new table; each value is a number (the main price) or a mapping like the YAML's."""
        raw = {'devices': dict(devices or {}), 'annotation': dict(annotation or {}),
               'llm': dict(llm or {})}
        return _merge(self, raw, origin)


def _entry_dict(v: Any, main_key: str, where: str) -> dict:
    """An entry as a mapping; a bare number is its main price (`A100: 2.5`)."""
    if isinstance(v, Mapping):
        return dict(v)
    if v is None or isinstance(v, (list, tuple)):
        raise PriceError(f'{where}: expected a mapping (e.g. {{{main_key}: X}}) or a number, '
                         f'got {v!r}.')
    return {main_key: v}


def _check_keys(entry: Mapping, valid: tuple[str, ...], where: str) -> None:
    unknown = [str(k) for k in entry if k not in valid]
    if not unknown:
        return
    hints = [f'{k!r} -> {m[0]!r}?' for k in unknown
             if (m := difflib.get_close_matches(k, valid, n=1, cutoff=0.6))]
    raise PriceError(f'{where}: unknown key(s) {", ".join(map(repr, unknown))}'
                     f'{" (did you mean " + ", ".join(hints) + ")" if hints else ""}; '
                     f'valid keys: {", ".join(valid)}.')


def _section(raw: Mapping, key: str, origin: str) -> Mapping:
    section = raw.get(key) or {}
    if not isinstance(section, Mapping):
        raise PriceError(f'{origin}: `{key}` must be a mapping of entry name -> fields, got '
                         f'{type(section).__name__}.')
    return section


def _field(entry: Mapping, key: str, where: str) -> Decimal:
    if key not in entry:
        raise PriceError(f'{where}: missing `{key}` (got keys {sorted(entry)}).')
    try:
        value = to_decimal(entry[key])
    except PriceError as e:
        raise PriceError(f'{where}.{key}: {e}') from None
    if value < 0:
        raise PriceError(f'{where}.{key}: cannot be negative ({value}).')
    return value


def _aliases(entry: Mapping, where: str, default: tuple[str, ...], regex: bool) -> tuple[str, ...]:
    aliases = entry.get('aliases', default)
    if isinstance(aliases, str):
        aliases = [aliases]
    if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
        raise PriceError(f'{where}.aliases: expected a list of strings, got {aliases!r}.')
    for a in aliases if regex else ():
        try:
            re.compile(a)
        except re.error as e:
            raise PriceError(f'{where}.aliases: bad regular expression {a!r}: {e}') from None
    return tuple(aliases)



def _positive(entry, key: str, where: str, scale: float, what: str, default):
    """entry[key] * scale, checked positive; `default` when the entry leaves it out."""
    if key not in entry:
        return default
    value = _field(entry, key, where)
    if value == 0:
        raise PriceError(f'{where}.{key}: must be positive; leave it out when {what} is unknown.')
    return float(value) * scale

def _device_entry(name: str, entry: Any, old: DeviceEntry | None, origin: str) -> DeviceEntry:
    """A YAML device entry, on top of the entry of the same name when there is one."""
    where = f'{origin}: devices.{name}'
    entry = _entry_dict(entry, 'usd_per_hour', where)
    _check_keys(entry, _DEVICE_KEYS, where)
    if old is None and not {'usd_per_hour', 'peak_bf16_tflops', 'memory_gb'} & set(entry):
        raise PriceError(f'{where}: a new device entry needs `usd_per_hour`, '
                         f'`peak_bf16_tflops` and/or `memory_gb` (got keys {sorted(entry)}).')
    price = (_field(entry, 'usd_per_hour', where) if 'usd_per_hour' in entry
             else old.usd_per_hour if old else None)
    peak = _positive(entry, 'peak_bf16_tflops', where, 1e12, 'the peak',
                     old.peak_bf16_flops if old else None)
    memory = _positive(entry, 'memory_gb', where, 1e9, 'the memory',
                       old.memory_bytes if old else None)
    source = entry.get('source', 'user override' if 'usd_per_hour' in entry
                       else old.source if old else '')
    flops_source = entry.get('flops_source', 'user override' if 'peak_bf16_tflops' in entry
                             else old.flops_source if old else '')
    return DeviceEntry(name, price, peak, _aliases(entry, where, old.aliases if old else (), True),
                       str(source).strip(), str(flops_source).strip(), memory)


def _merge(base: PriceTable | None, raw: Mapping, origin: str) -> PriceTable:
    """Apply a YAML-shaped dict on top of `base` (entries with the same name are updated)."""
    _check_keys(raw, _TOP_LEVEL_KEYS, f'{origin}: top level')
    devices = {d.name: d for d in (base.devices if base else ())}
    order = [d.name for d in (base.devices if base else ())]
    added: list[str] = []
    for name, entry in _section(raw, 'devices', origin).items():
        name = str(name)
        if name not in devices:
            added.append(name)
        devices[name] = _device_entry(name, entry, devices.get(name), origin)
    annotation = dict(base.annotation) if base else {}
    for name, entry in _section(raw, 'annotation', origin).items():
        where = f'{origin}: annotation.{name}'
        entry = _entry_dict(entry, 'usd_per_label', where)
        _check_keys(entry, _ANNOTATION_KEYS, where)
        price = _field(entry, 'usd_per_label', where)
        for key in [str(name), *_aliases(entry, where, (), False)]:
            annotation[normalize_name(key)] = price
    llm = dict(base.llm) if base else {}
    for name, entry in _section(raw, 'llm', origin).items():
        where = f'{origin}: llm.{name}'
        if not isinstance(entry, Mapping):
            raise PriceError(f'{where}: expected a mapping with usd_per_1k_input and '
                             f'usd_per_1k_output, got {entry!r}.')
        _check_keys(entry, _LLM_KEYS, where)
        llm[normalize_name(str(name))] = LLMPrice(
            str(name), _field(entry, 'usd_per_1k_input', where),
            _field(entry, 'usd_per_1k_output', where), str(entry.get('source', '')).strip())
    # A user's new entries are tried before the defaults: they are usually more specific.
    order = added + order if base is not None else order + added
    label = origin if base is None else f'{base.origin} + {origin}'
    return PriceTable(tuple(devices[n] for n in order), annotation, llm, label)


def _read_yaml(text: str, origin: str) -> Mapping:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PriceError(f'{origin}: not valid YAML: {e}') from None
    if not isinstance(raw, Mapping):
        raise PriceError(f'{origin}: expected a mapping at the top level, got '
                         f'{type(raw).__name__}.')
    return raw


def default_prices() -> PriceTable:
    """The packaged table: the paper's A100 price and labelled assumptions for everything else."""
    text = importlib.resources.files(__package__).joinpath(DEFAULT_PRICE_FILE).read_text()
    return _merge(None, _read_yaml(text, DEFAULT_PRICE_PATH), DEFAULT_PRICE_PATH)


def load_prices(path: str | os.PathLike | None = None, replace: bool = False) -> PriceTable:
    """Defaults, overridden by the YAML at `path` (or replaced by it when `replace=True`)."""
    if path is None:
        return default_prices()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PriceError(f'price file {path!r} does not exist; pass an existing YAML file '
                         f'(layout: see {DEFAULT_PRICE_PATH}).')
    with open(path) as f:
        raw = _read_yaml(f.read(), path)
    return _merge(None if replace else default_prices(), copy.deepcopy(dict(raw)), path)


# ---- money ------------------------------------------------------------------------------------
def device_cost_usd(seconds: float, device_count: int, usd_per_device_hour: Any) -> float:
    """Wall-clock seconds on `device_count` devices, in dollars (4 A100s x 2 h x $1.875 = $15)."""
    if seconds < 0 or device_count < 0:
        raise ValueError(f'seconds ({seconds}) and device_count ({device_count}) must be >= 0.')
    usd = to_decimal(seconds) * device_count * to_decimal(usd_per_device_hour) / _SECONDS_PER_HOUR
    return float(usd)


def annotation_cost_usd(task: str, n_labels: int, prices: PriceTable | None = None) -> float:
    """Dollars for `n_labels` gold labels of `task` at the table's $/label (WLP 1K -> $260)."""
    if n_labels < 0:
        raise ValueError(f'n_labels must be >= 0, got {n_labels}.')
    prices = prices or default_prices()
    return float(prices.usd_per_label(task) * n_labels)


def llm_cost_usd(model: str, input_tokens: int, output_tokens: int,
                 prices: PriceTable | None = None) -> float:
    """Dollars for an LLM annotator's prompt and completion tokens at per-1K-token prices."""
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError(f'token counts must be >= 0, got {input_tokens}, {output_tokens}.')
    p = (prices or default_prices()).llm_price(model)
    return float((p.usd_per_1k_input * input_tokens + p.usd_per_1k_output * output_tokens)
                 / Decimal(1000))


def format_usd(x: float) -> str:
    """'$1,980' style for whole dollars, cents below $100, 3 significant digits below a dollar in
    plain decimals (a tiny CPU run costs $0.0000891, not $8.91e-05): readable at every scale a
    study spans, and never a rounded '$0.00' for money that was spent. Zero (-0.0 too) is '$0';
    a negative amount is '-$0.0000123'."""
    x = float(x)
    if x == 0:
        return '$0'
    sign, x = ('-' if x < 0 else ''), abs(x)
    if x >= 100:
        return f'{sign}${x:,.0f}'
    if x >= 1:
        return f'{sign}${x:,.2f}'
    rounded = float(f'{x:.3g}')                  # 0.0999999 -> 0.1: three digits from here
    decimals = 2 - math.floor(math.log10(rounded))
    return f'{sign}${rounded:.{decimals}f}'
