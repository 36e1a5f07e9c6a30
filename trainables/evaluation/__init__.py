"""Evaluation: FID, precision/recall and KID on feature sets, reference statistics."""
