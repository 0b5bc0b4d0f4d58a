"""Cost accounting: device-hours, labels and LLM tokens in dollars, a durable ledger, budgets."""

from doa_jax.cost.budget import (BudgetExceededError, Estimate, check_budget,
                                 estimate_from_benchmark, estimate_from_flops,
                                 estimate_from_warmup)
from doa_jax.cost.callback import CostCallback
from doa_jax.cost.cost_model import ComputeCostModel
from doa_jax.cost.ledger import LEDGER_FILENAME, Ledger, LedgerError, StageSummary
from doa_jax.cost.meter import ComputeMeter, DeviceInfo, device_info
from doa_jax.cost.prices import (PriceError, PriceTable, annotation_cost_usd, default_prices,
                                 device_cost_usd, llm_cost_usd, load_prices)

__all__ = [
    'BudgetExceededError', 'ComputeCostModel', 'ComputeMeter', 'CostCallback', 'DeviceInfo',
    'Estimate', 'LEDGER_FILENAME', 'Ledger', 'LedgerError', 'PriceError', 'PriceTable',
    'StageSummary', 'annotation_cost_usd', 'check_budget', 'default_prices', 'device_cost_usd',
    'device_info', 'estimate_from_benchmark', 'estimate_from_flops', 'estimate_from_warmup',
    'llm_cost_usd', 'load_prices',
]
