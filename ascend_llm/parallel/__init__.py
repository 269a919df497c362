"""Inside the training step: layout and groups (dims), data parallel (dp), and the sharded-optimizer,
tensor and context parallel code built on explicit collectives.

Importing this package does not import MindSpore; the modules that need it import it themselves.
"""
