"""Every error labutils raises on purpose, in one place; each message names the problem and the fix."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field (or notebook parameter) and the fix."""


class DataError(ValueError):
    """Bad data input: the message names the problem and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with, or does not fit what loads it."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, busy out_dir); the message says why and what to change."""


class StudyError(RuntimeError):
    """Some runs of a study failed; the finished ones are kept and a re-run resumes the rest."""
