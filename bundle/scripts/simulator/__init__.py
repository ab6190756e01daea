"""MR-physics simulator: MNI152 anatomy -> tissue properties -> signal equations -> acquisition -> BIDS dataset."""
