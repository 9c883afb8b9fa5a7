"""The practical guide (Yang et al. 2023), made executable: the decision flow of their
Fig. 2 (`flow`), the model catalog and evolutionary tree (`catalog`), cost and latency
estimates (`cost`), and the measured comparison of a prompted LLM with a fine-tuned small
model on the user's own labelled data (`compare`)."""
