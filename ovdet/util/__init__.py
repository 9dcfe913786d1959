"""Helpers that import nothing of ovdet but its errors: display escaping, progress, safe file IO, device choice."""
