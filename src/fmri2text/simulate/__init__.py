"""The video-fMRI simulator: a BIDS dataset in HAD's layout with ground truth."""
