"""Price tables: $ per device-hour, $ per gold label, $ per 1K LLM tokens.

Money is computed with `decimal.Decimal` from the table's literal figures, so the paper's quoted
costs (e.g. 5K FEVER labels x $0.129 = $645) come out exactly instead of 645.0000000000001.
The library takes tables as arguments; only entry points bind a price file through gin.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import re
from decimal import Decimal
from typing import Any, Mapping

import yaml

DEFAULT_PRICE_FILE = 'prices.yaml'
_SECONDS_PER_HOUR = Decimal(3600)


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
class DevicePrice:
    name: str
    usd_per_hour: Decimal
    aliases: tuple[str, ...] = ()
    source: str = ''


@dataclasses.dataclass(frozen=True)
class LLMPrice:
    name: str
    usd_per_1k_input: Decimal
    usd_per_1k_output: Decimal
    source: str = ''


@dataclasses.dataclass(frozen=True)
class PriceTable:
    """All prices one study uses. Build with `load_prices()`; never mutate, use `with_overrides`."""

    devices: tuple[DevicePrice, ...]
    annotation: Mapping[str, Decimal]          # normalised task name or alias -> $ per label
    llm: Mapping[str, LLMPrice]                # normalised model name -> prices
    origin: str = '<default>'

    # ---- devices ----------------------------------------------------------------------------
    def device_price(self, device_kind: str, fallback: str | None = None) -> DevicePrice:
        """Price entry for a jax device kind; `fallback` names an entry to use when none matches."""
        norm = normalize_device_kind(device_kind)
        for entry in self.devices:
            if normalize_device_kind(entry.name) == norm:
                return entry
            if any(re.search(a, norm) for a in entry.aliases):
                return entry
        if fallback is not None:
            for entry in self.devices:
                if entry.name == fallback or normalize_device_kind(entry.name) == \
                        normalize_device_kind(fallback):
                    return entry
            raise PriceError(f'fallback device price {fallback!r} is not in the price table '
                             f'({self.origin}); known: {", ".join(d.name for d in self.devices)}.')
        raise PriceError(
            f'No price for device kind {device_kind!r} (normalised {norm!r}) in {self.origin}. '
            f'Known entries: {", ".join(d.name for d in self.devices)}. Fix: add it to a price '
            f'YAML (devices: {{"{device_kind}": {{usd_per_hour: X}}}}) and pass it as '
            f'prices= (gin: --gin.CostCallback.prices="\'my_prices.yaml\'"), or pass '
            f'fallback="A100" (gin: --gin.CostCallback.device_price_fallback="\'A100\'") to '
            f'price it like a known device.')

    def usd_per_device_hour(self, device_kind: str, fallback: str | None = None) -> Decimal:
        return self.device_price(device_kind, fallback).usd_per_hour

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
        raw = {'devices': {k: _entry_dict(v, 'usd_per_hour') for k, v in (devices or {}).items()},
               'annotation': {k: _entry_dict(v, 'usd_per_label')
                              for k, v in (annotation or {}).items()},
               'llm': dict(llm or {})}
        return _merge(self, raw, origin)


def _entry_dict(v: Any, main_key: str) -> dict:
    return dict(v) if isinstance(v, Mapping) else {main_key: v}


def _field(entry: Mapping, key: str, where: str) -> Decimal:
    if key not in entry:
        raise PriceError(f'{where}: missing `{key}` (got keys {sorted(entry)}).')
    try:
        value = to_decimal(entry[key])
    except PriceError as e:
        raise PriceError(f'{where}.{key}: {e}') from None
    if value < 0:
        raise PriceError(f'{where}.{key}: a price cannot be negative ({value}).')
    return value


def _merge(base: PriceTable | None, raw: Mapping, origin: str) -> PriceTable:
    """Apply a YAML-shaped dict on top of `base` (entries with the same name are updated)."""
    unknown = set(raw) - {'devices', 'annotation', 'llm'}
    if unknown:
        raise PriceError(f'{origin}: unknown top-level key(s) {sorted(unknown)}; expected '
                         f'devices, annotation, llm.')
    devices = {d.name: d for d in (base.devices if base else ())}
    order = [d.name for d in (base.devices if base else ())]
    added: list[str] = []
    for name, entry in (raw.get('devices') or {}).items():
        entry = _entry_dict(entry, 'usd_per_hour')
        where = f'{origin}: devices.{name}'
        old = devices.get(name)
        price = (_field(entry, 'usd_per_hour', where) if 'usd_per_hour' in entry or old is None
                 else old.usd_per_hour)
        aliases = tuple(entry.get('aliases', old.aliases if old else ()))
        for a in aliases:
            try:
                re.compile(a)
            except re.error as e:
                raise PriceError(f'{where}.aliases: bad regular expression {a!r}: {e}') from None
        source = entry.get('source', 'user override' if 'usd_per_hour' in entry else
                           (old.source if old else ''))
        devices[name] = DevicePrice(name, price, aliases, str(source).strip())
        if old is None:
            added.append(name)
    annotation = dict(base.annotation) if base else {}
    for name, entry in (raw.get('annotation') or {}).items():
        entry = _entry_dict(entry, 'usd_per_label')
        price = _field(entry, 'usd_per_label', f'{origin}: annotation.{name}')
        for key in [name, *entry.get('aliases', ())]:
            annotation[normalize_name(key)] = price
    llm = dict(base.llm) if base else {}
    for name, entry in (raw.get('llm') or {}).items():
        where = f'{origin}: llm.{name}'
        if not isinstance(entry, Mapping):
            raise PriceError(f'{where}: expected a mapping with usd_per_1k_input and '
                             f'usd_per_1k_output, got {entry!r}.')
        llm[normalize_name(name)] = LLMPrice(
            name, _field(entry, 'usd_per_1k_input', where),
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
    return _merge(None, _read_yaml(text, f'doa_jax/cost/{DEFAULT_PRICE_FILE}'),
                  f'doa_jax/cost/{DEFAULT_PRICE_FILE}')


def load_prices(path: str | os.PathLike | None = None, replace: bool = False) -> PriceTable:
    """Defaults, overridden by the YAML at `path` (or replaced by it when `replace=True`)."""
    if path is None:
        return default_prices()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PriceError(f'price file {path!r} does not exist; pass an existing YAML file '
                         f'(layout: see doa_jax/cost/{DEFAULT_PRICE_FILE}).')
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
    """'$1,980' style for whole dollars, cents below $100, 3 significant digits below a dollar
    (a tiny CPU run costs $0.00x): readable at every scale a study spans."""
    x = float(x)
    if x == 0:
        return '$0'
    if abs(x) >= 100:
        return f'${x:,.0f}'
    if abs(x) >= 1:
        return f'${x:,.2f}'
    return f'${x:.3g}'
