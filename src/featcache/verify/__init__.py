"""The ``verify`` stage's machinery: named checks and the report (:mod:`.checks`), one module of
checks per output family, the spot check that recomputes features, and the pictures."""
