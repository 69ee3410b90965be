"""`python -m mlshift_jax` (and the `mlshift` script) runs the CLI.

Ctrl-C is caught from the first line on: while the CLI and JAX import (seconds), a
KeyboardInterrupt could be swallowed by an import-time callback and the run go on; here it
prints one line and exits 130 at once. `cli.main` then installs its own handler.
"""

import os
import signal
import sys


def _early_interrupt(signum, frame):
    sys.stderr.write("mlshift: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def entry() -> int:
    """The console script: the early Ctrl-C handler, then `cli.main`."""
    try:
        signal.signal(signal.SIGINT, _early_interrupt)
    except ValueError:  # not the main thread
        pass
    from mlshift_jax.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
