"""Outside the training process: HCCL rank tables, hccn discovery, the msrun / rank-table launcher and
the job supervisor. Importing this package does not import MindSpore.
"""
