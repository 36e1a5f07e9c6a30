"""How one varsweep trial runs: models, training steps, data, evaluation."""
