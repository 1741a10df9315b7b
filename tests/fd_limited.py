"""``python -m tests.fd_limited ARGS``: ``python -m distfd ARGS`` in a process whose hard and soft
limits on open files are ``DISTFD_TEST_NOFILE`` (so the service cannot raise them), for the tests of a
front that runs out of file descriptors."""

from __future__ import annotations

import os
import resource
import sys

if __name__ == "__main__":
    limit = int(os.environ["DISTFD_TEST_NOFILE"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    from distfd.cli import main

    sys.exit(main(sys.argv[1:]))
