"""Running recipes: `recipe` (validated recipes), `rundir` (run directories, completion
markers, manifests), `runner` and `stages` (the pipeline as one table of stages, cached
and resumed), `report` (a run's report), `compare` (controlled architecture comparisons),
and the scaling sweep (`scaling`, `scaling_points`, `scaling_report`)."""
