"""The lane agent: identification, pricing, awards and the journal (no device or network code)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lane-membership-agent")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+source"
