"""Dynamically Expandable Networks (Yoon et al., ICLR 2018): config, steps, tasks, baselines and the task sequence."""
