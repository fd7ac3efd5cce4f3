"""The coordinator: Flower ServerApp, strategies, checkpoints, tracking and reports."""
