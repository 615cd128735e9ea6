"""Knowledge Evolution (Taha et al., CVPR 2021): generations with a split (evolve.py), the fit hypothesis cut out (extract.py)."""
