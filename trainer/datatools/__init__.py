"""Q-data tooling, run by a person, not by the training process: `qsft-data` (cli.py), converting
the original data set (convert.py), the problem renderer shared with the shipped sample set
(problems.py), inspection and leakage checks (inspection.py, near_dup.py) and the q lint
(qlint.py)."""
