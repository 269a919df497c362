"""Training: the loop (`trainer.train`), the parts it is assembled from (`session`), the stateful-part
protocol (`state`), checkpoints (`checkpoint`), metrics and throughput (`metrics`), the model converters
(`build`), the compiled step (`step`), the optimizer and schedule.

Importing this package imports nothing heavy; import the modules you need.
"""
