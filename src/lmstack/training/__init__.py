"""Pretraining: objectives, the loop, optimizer and schedules, checkpoints and resume, distributed."""
