"""The one error type for bad sparsity configuration."""


class SparsityConfigError(ValueError):
    """Bad configuration, raised at fit start. The message names the key, the value and what is allowed."""
