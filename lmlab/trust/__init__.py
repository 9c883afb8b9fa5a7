"""Trust (Kaddour et al.): telling generated text apart (watermark detection, likelihood
based detectors), checking what a model says (hallucination checks), and probing what it
memorised (canaries, extraction, PII in generations)."""
