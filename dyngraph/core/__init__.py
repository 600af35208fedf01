"""The spec format's base: value types, problems and errors, the YAML reader (imports nothing of dyngraph)."""
