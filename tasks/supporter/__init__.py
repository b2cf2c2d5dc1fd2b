"""Stage 7: the supporter's SFT data, look-ahead rollouts, preference pairs and training."""
