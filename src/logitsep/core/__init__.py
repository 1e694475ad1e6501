"""What every layer of logitsep uses, and nothing of logitsep itself: input checks (:mod:`.checks`), crash-safe
files (:mod:`.files`), metric names (:mod:`.keys`), the ranking core (:mod:`.ranking`), image decoding
(:mod:`.images`), provenance of figures (:mod:`.provenance`), optional extras (:mod:`.extras`), tables and
plots (:mod:`.tables`, :mod:`.plots`)."""
