"""FeatSharp: a learned upsampler for a low-resolution teacher (``model``), its file (``file``), the
caching-time adaptation that wraps any teacher with it (``adaptation``), and its training job (``views``,
``report``, ``train``)."""
