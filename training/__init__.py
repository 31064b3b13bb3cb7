"""Training lane: deep and reinforcement-learning models in PyTorch (see the training issue)."""
