"""``distfd serve``: the HTTP service, one file per job.

- :mod:`.command`: the subcommand's options and startup (checks, ranks, pipeline, pool);
- :mod:`.front`: what every image route does (token, bounded body, the one intake off the event
  loop, queue, deadline, cancellation, errors that leak nothing);
- :mod:`.app`: the routes (/health, /generate, /metrics; JSON 404/405);
- :mod:`.openai`: the OpenAI images API on the same front (docs/openai.md);
- :mod:`.server`: uvicorn in a background thread of rank 0, with per-connection bounds;
- :mod:`.auth`: the bearer token and where the service may listen;
- :mod:`.metrics`: Prometheus metrics.

The images are made by :mod:`distfd.pool` (groups of ranks, dispatch, cancellation), which batch jobs
use too; request bounds are :mod:`distfd.limits`, every request's checks :mod:`distfd.intake`.
"""

from .command import add_parser, run

__all__ = ["add_parser", "run"]
