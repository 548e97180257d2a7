"""The parts of the training core that `hybridgan.session.TrainingSession` composes, one job each:

- `errors`: `TrainingError`, the one-line failure of a stage,
- `engine`: the Accelerator of a stage and what goes into it (each rank's share of the global batch,
  models, optimisers, a backward and step),
- `folder`: the stage folder (its lock, the config rules of a resume, `launches.jsonl`),
- `cadence`: which step of which epoch, and what a step is due for (log, evaluation, checkpoint,
  stop), by steps, by minutes and by stop signals, the same on every rank,
- `loss_book`: the losses (epoch sums and means over ranks, read-back at log steps) and the NaN guard,
- `resume`: the checkpoints of a stage: the one a (re-)run resumes from (damaged ones moved aside,
  `run.restart_damaged`), and the save of the current step and the wait for its background write,
- `progress`: what a stage shows as it trains (`metrics.jsonl`, the trackers, the progress bar),
- `cli`: a stage's command line.

The checkpoints' files (layout, manifests, the background writer) are `hybridgan.checkpoint`.
"""
