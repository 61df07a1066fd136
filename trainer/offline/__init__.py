"""Offline tools over checkpoints and plans, run by a person (consolidate.py also as the training
process's background child, in its own process): the streaming ZeRO reader (zero_reader.py),
the consolidated Hugging Face export (consolidate.py, `qsft-consolidate`) and the memory planner
(plan.py, plan_cli.py: `qsft-plan`). The training process imports nothing from here."""
