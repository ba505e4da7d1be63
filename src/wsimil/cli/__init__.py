"""The ``wsimil`` command: a thin layer over the Python API.

One module per group of commands; each registers its commands on :data:`app` when imported, in
the order ``wsimil --help`` lists them."""

from wsimil.cli.common import app

# isort: off
import wsimil.cli.train  # noqa: F401
import wsimil.cli.data  # noqa: F401
import wsimil.cli.demo  # noqa: F401
import wsimil.cli.predict  # noqa: F401
import wsimil.cli.export  # noqa: F401
import wsimil.cli.lrmil  # noqa: F401
# isort: on

__all__ = ["app"]
