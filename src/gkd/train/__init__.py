"""Training: the loop (trainer), components from config sections (build), one step's forward and backward
(step), checkpoints, metrics, held-out evaluation and the output folder."""
