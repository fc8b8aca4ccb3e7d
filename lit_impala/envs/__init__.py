"""Gymnasium env factories and wrappers (Atari included): what the actors step, and the env facts the
learner needs."""
