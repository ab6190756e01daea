"""Training: the MONAI engines' handlers and batch preparation, super-resolution patches, prompt dropout."""
