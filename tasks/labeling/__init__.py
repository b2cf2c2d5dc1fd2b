"""Stage 2, label: valence, sentiment and 20 values per utterance; the value head; the ESConv analysis (paper §3)."""
