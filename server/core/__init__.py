"""The bottom layer: models, errors, ids, metrics and small utilities. Imports nothing of ours."""
