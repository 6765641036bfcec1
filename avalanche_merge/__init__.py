"""avalanche-merge: stable continual adaptation of pretrained models, as Avalanche plugins and strategies.

Importing the package is cheap: registries fill when their subpackages are imported
(``avalanche_merge.benchmarks``, ``avalanche_merge.models``, ``avalanche_merge.strategies``).
"""

from .version import __version__


def list_methods() -> list[str]:
    """Names of all registered methods (Avalanche baselines and avalanche-merge methods)."""
    from .strategies import list_methods as _list

    return _list()


def list_benchmarks() -> list[str]:
    """Names of all registered benchmarks."""
    from .benchmarks import list_benchmarks as _list

    return _list()


def list_backbones() -> list[str]:
    """Names of all registered backbones."""
    from .models import list_backbones as _list

    return _list()


__all__ = ["__version__", "list_backbones", "list_benchmarks", "list_methods"]
