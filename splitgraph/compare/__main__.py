"""`python -m splitgraph.compare`: the same as the `splitgraph-compare` console script."""

from splitgraph.compare.main import main

main()
