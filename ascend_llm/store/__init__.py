"""What lies on disk: crash-safe writes and the checkpoint format (the ground floor: imports no other folder)."""
