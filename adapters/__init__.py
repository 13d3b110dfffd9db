"""Modality adapters (installed as mmmerge.adapters)."""
