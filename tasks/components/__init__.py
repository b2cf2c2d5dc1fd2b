"""Stages 3-4: the TVD and RG datasets, the target value detector, the reference generator, and the
LoRA training they share."""
