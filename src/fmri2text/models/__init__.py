"""Models: the offline zoo, the teacher, the fMRI student."""
