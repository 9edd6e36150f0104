"""distill_dist: prune the MLPs of a decoder LLM, then recover with CE fine-tuning or KL self-distillation."""

__version__ = "0.1.0"
