"""The installed nanoserve's version (`--version`, GET /version, the startup banner)."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("nanoserve")
    except PackageNotFoundError:  # run from a tree that is not installed (the GPU image's symlinked package)
        return "unknown"
