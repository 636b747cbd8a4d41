"""readingrace: do deep models read race (sex, age) from medical images? Reproduce and audit."""

__version__ = "0.1.0"
