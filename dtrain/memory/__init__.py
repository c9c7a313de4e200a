"""Memory: the planner (``plan``, no torch) and the runtime meters (``meters``)."""
