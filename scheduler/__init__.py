"""Requests, sequences and planning: the FCFS planner now, the MACE scheduler later (issue 6)."""
