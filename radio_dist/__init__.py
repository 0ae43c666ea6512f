"""radio-dist: cache frozen vision teachers once per image, distill many students from the cache."""

__version__ = "0.1.0"
