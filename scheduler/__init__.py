"""Planning: requests and sequences, the policies that build each iteration's plan (FCFS and
MACE), the cost model that prices a plan, and the engine around them (``EngineCore`` on plain data,
``AsyncEngine`` on the event loop)."""
