"""Capacity evaluation (Zhao et al. §7, Kaddour et al. on brittle evaluations): what is
scored and how well. Language modelling (`lm`), held-out question answering (`qa`), task
files in lm-evaluation-harness's shape and the `lmlab eval` harness (`tasks`, `harness`),
generated reasoning tasks (`synthetic`), template spread and input perturbations
(`perturb`), code scored by pass@k (`code`), metrics, error bars and calibration
(`metrics`, `stats`, `calibration`), contamination checks, LLM-as-a-judge ratings (`judge`)
and lmlab as an lm-eval model (`lmeval`). How prompts are built and answers read out of
generations lives a layer below, in `lmlab.prompt`."""
