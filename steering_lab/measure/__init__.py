"""Measuring what a direction does: attribution patching, cross-lingual checks."""
