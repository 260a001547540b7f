"""`dadpo-offline eval`: MT-Bench, AlpacaEval, win rate vs teacher and lm-eval, judged by any OpenAI-compatible endpoint."""
