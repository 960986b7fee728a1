"""`python -m splitgraph.train`: the same as the `splitgraph-train` console script."""

from splitgraph.train.run import cli

if __name__ == "__main__":
    cli()
