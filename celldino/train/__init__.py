"""Training: schedules, parameter groups, the SSL meta-architecture, the trainer and its launchers."""
