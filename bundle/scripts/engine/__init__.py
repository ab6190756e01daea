"""Running a trained network: the sliding-window engine, test-time steps, volume I/O, previews and evaluation."""
