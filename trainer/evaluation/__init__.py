"""Execution-based evaluation, run by a person after training (qsft-eval): generation in the
checkpoint's own prompt format (generate.py), untrusted answers run in a confined process
(sandbox.py), pass@k per task kind (scoring.py), and the command line with best-checkpoint
selection for the RL stage (cli.py). The training process imports nothing from here."""
