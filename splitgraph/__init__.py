"""splitgraph: an MLP's computational graph split by layer into pipeline stages.

    config -> model -> partition (Plan) -> schedule (validated actions) -> runtime -> outputs

Entry points: `python -m splitgraph.train` (under torchrun), `splitgraph-check`.
"""

__version__ = "0.1.0"
