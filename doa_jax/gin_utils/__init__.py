"""gin at the entry points only (t5x's `gin_utils`, for doa_jax's entry points).

  configurables.py  every gin configurable, registered in gin module `doa_jax` (one table), and
                    the gin glue functions (get_model_config, pseudo_labeled_task, study, ...)
  parsing.py        t5x's flags, parsing the gin files and flag bindings, the configuration
                    checks (ConfigError), reading bound values back
  run_record.py     the gin-configured training with its record in MODEL_DIR, its fingerprint
                    and its one-line summary

Library modules never import gin; the entry points (`python -m doa_jax.train`, `.infer`,
`.study`, the memory gate) use the names this package exports.
"""

from doa_jax.gin_utils.configurables import (CONFIGURABLE, GIN_MODULE, get_model_config,
                                             import_task_modules, register_configurables)
from doa_jax.gin_utils.parsing import (REPO_ROOT, Bound, ConfigError, GinSources, binding_key,
                                       bound_value, check_entry_bindings, check_path,
                                       macro_value, parse_flags, parse_gin, run_cli,
                                       setup_logging)
from doa_jax.gin_utils.run_record import (RunRecord, RunSummary, ledger_spent_usd,
                                          run_configured_training, training_description)

__all__ = ['CONFIGURABLE', 'GIN_MODULE', 'get_model_config', 'import_task_modules',
           'register_configurables', 'REPO_ROOT', 'Bound', 'ConfigError', 'GinSources',
           'binding_key', 'bound_value', 'check_entry_bindings', 'check_path', 'macro_value',
           'parse_flags', 'parse_gin', 'run_cli', 'setup_logging', 'RunRecord', 'RunSummary',
           'ledger_spent_usd', 'run_configured_training', 'training_description']
