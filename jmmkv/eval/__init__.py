"""Evaluation harnesses (MileBench; synthetic tasks)."""
