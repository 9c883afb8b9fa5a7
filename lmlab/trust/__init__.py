"""Telling generated text apart and checking what a model says: watermark detection."""
