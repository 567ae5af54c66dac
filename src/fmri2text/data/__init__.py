"""Reading BIDS video-fMRI datasets into trial tables and per-trial responses."""
