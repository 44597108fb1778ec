"""somad: a streaming anomaly daemon built on the soma byte-level online learner."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("somad")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0+src"
