"""Promptable segmenters (SAM2, SAM): data and prompts, losses, evaluation, the feature cache,
the training loop and its hooks, the recipe, and the model families under `models`."""
