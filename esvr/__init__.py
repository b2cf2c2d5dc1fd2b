"""ES-VR: emotional support via value reinforcement, as a Prefect + MLflow pipeline."""

__version__ = "0.1.0"
