"""Spec loading, schema and errors."""
