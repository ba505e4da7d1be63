"""wsimil: weakly supervised whole-slide image classification with multiple instance learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsimil")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
