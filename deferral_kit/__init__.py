"""deferral_kit: why is mail to a destination being deferred, and what to do about it.

Loaders turn MTA logs and ESP event exports into one canonical table of delivery
attempts (:mod:`deferral_kit.schema`); metrics, classification and analysis modules
reduce it to small frames that notebooks chart and reports export as offline HTML.
"""

from .loaders import Load, LoadOptions, load

__version__ = "0.1.0"

__all__ = ["load", "Load", "LoadOptions", "__version__"]
