"""The exact machinery every method shares: trace (graph), choose (plan), cut (surgery), widen two networks
into one (widen), what a file holds (formats), count (cost), and the construct scan that refuses what cannot
be cut exactly. The bottom package: it imports no other slimkit package."""
