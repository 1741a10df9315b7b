"""``distfd serve``: the HTTP service, one file per job.

- :mod:`.command`: the subcommand's options and startup (checks, ranks, pipeline, pool);
- :mod:`.app`: the routes (bounded bodies, validation off the event loop, deadlines, cancellation);
- :mod:`.openai`: the OpenAI images API on the same front (docs/openai.md);
- :mod:`.server`: uvicorn in a background thread of rank 0;
- :mod:`.auth`: the bearer token and where the service may listen;
- :mod:`.metrics`: Prometheus metrics.

The images are made by :mod:`distfd.pool` (groups of ranks, dispatch, cancellation), which batch jobs
use too; request bounds are :mod:`distfd.limits`.
"""

from .command import add_parser, run

__all__ = ["add_parser", "run"]
