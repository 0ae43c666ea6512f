"""The benchmarks behind the README's figures: ``radio-dist bench cache`` (``cache``) and ``bench ingest``
(``ingest``)."""
