"""The training run: the recipe (setup, fit, finish), its builders and the loop, and what they use."""
