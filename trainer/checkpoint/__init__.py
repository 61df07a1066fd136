"""Checkpoints on disk: what the training process writes, resumes from and keeps.

In the training process: `writer` (crash-safe save), `resume` (pick and load a checkpoint),
`retention` (disk checks, pruning), `consolidator` (the background child that consolidates
each save). `layout` holds the names of the files in a tag directory, shared with the offline
reader `trainer.offline.consolidate`, which runs by hand or as that child.
"""
