"""The exact machinery every method shares: trace (graph), choose (plan), cut (surgery), store (checkpoint),
count (cost), and the construct scan that refuses what cannot be cut exactly."""
