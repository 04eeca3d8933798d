"""Stage 2: the distillation loss, recipes, the trainer, run files and the run itself."""
