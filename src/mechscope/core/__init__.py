"""Foundations shared by every stage: hook-name vocabulary, shapes, errors. Imports nothing of ours."""
