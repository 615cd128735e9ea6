"""Merging two teachers (Pasen & Boza, 2022): network transformations (transform.py) and the pipeline (merging.py)."""
