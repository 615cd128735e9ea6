"""Data: the bundled digits (digits.py), image directories (images.py), augmentation presets
(augment.py), epoch batches and loader processes (loading.py), and the splits a training verb reads
(select.py)."""
