"""Scoring decoded text: metrics, baselines, controls."""
