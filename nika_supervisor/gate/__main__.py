"""`python -m nika_supervisor.gate`: the gate process (spawned by the daemon only)."""

import sys

from nika_supervisor.gate.server import main

sys.exit(main())
