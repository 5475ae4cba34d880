"""persistd: the translation system's persistence daemon. The daemon is persistd.daemon."""
