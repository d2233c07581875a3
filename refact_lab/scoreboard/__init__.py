"""The completion scoreboard: seeded cursors from a project's held-out files, completed through the served engine
path, scored per kind of cursor (exact match, edit similarity, identifier F1, degenerate share, latency).

cursors.py draws the cursors, metrics.py scores one completion and aggregates, runner.py completes them with
the serving Engine (base model and LoRA checkpoints), results.py persists and reads back what was measured.
"""
