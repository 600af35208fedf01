"""The profiler: per-input MACs, per-path latency, reports."""

from .profile import SCHEMA, PathStats, Profile, profile

__all__ = ["SCHEMA", "PathStats", "Profile", "profile"]
