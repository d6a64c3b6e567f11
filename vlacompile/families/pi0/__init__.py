"""pi0 and pi0.5 (LeRobot >= 0.5 policy directories): configuration, modeling, processor, family hooks."""
