"""`python -m safetypatch ...`: the same command line as the `safetypatch` script."""

import sys

from .cli import main

sys.exit(main())
