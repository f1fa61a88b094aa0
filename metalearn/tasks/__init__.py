"""Task samplers and data sources."""

from metalearn.tasks.sine import sample_frequency_tasks, sample_sine_tasks

__all__ = ["sample_frequency_tasks", "sample_sine_tasks"]
