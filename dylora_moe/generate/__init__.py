"""``dylora generate``: sample from a trained mixture (``command``). Sits beside ``eval``: it uses the
model and the data's prompt template, and nothing of training."""
