"""`dadpo-offline sweep`: a grid of preference runs from one cache (run.py), its table and plots (table.py)."""
