"""`python -m splitgraph.exercises N [overrides]`: the same as `splitgraph-exercise`."""

import sys

from splitgraph.exercises.cli import main

sys.exit(main())
