"""Model workers: a supervisor (no torch) driving a spawned child process that holds the model."""
