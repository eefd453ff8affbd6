"""The installed version of hf_edit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf_edit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
