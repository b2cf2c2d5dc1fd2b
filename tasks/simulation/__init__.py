"""Stages 5-6: seeker personas, the supporter and seeker agents, the simulation engine, the crisis guard."""
