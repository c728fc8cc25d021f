"""``python -m netsim`` and the ``netsim`` script: see :mod:`netsim.cli.main`."""

import sys

from netsim.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
