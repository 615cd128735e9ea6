"""Training methods. Each ends in a network whose KeepPlan the surgery can cut."""
