"""`python -m splitgraph.train`: the same as the `splitgraph-train` console script."""

from splitgraph.train.cli import train_main

if __name__ == "__main__":
    train_main()
