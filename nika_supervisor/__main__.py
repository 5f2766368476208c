"""`python -m nika_supervisor` is the same as the `nika-supervisor` console script."""

import sys

from nika_supervisor.cli import main

sys.exit(main())
