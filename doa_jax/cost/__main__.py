"""Entry point: `python -m doa_jax.cost report DIR [--json]`."""

import sys

from doa_jax.cost.report import main

if __name__ == '__main__':
    sys.exit(main())
