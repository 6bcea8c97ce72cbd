"""Continual learning around the tuner: methods and baselines, losses, the objective and the Accelerate trainer."""
