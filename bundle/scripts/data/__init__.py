"""Data preparation: BIDS datasets and datalists, intensity normalisation, registration."""
