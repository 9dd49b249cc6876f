"""Features: statistics of dictionary latents and MLP neurons over a corpus, steering, auto-interpretation."""
