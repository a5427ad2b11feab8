"""``metaif import``: a run directory from weights trained elsewhere (issue 12; method §1)."""
