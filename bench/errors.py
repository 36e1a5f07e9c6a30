"""The project's error base. Every problem with a user's input (a config, a path, a dataset, a checkpoint, a
privacy budget, a results folder) raises a subclass naming the input and the problem; the command-line entry
points print it as one ``error: ...`` line and exit with status 2. Standard library only.
(``trainables.models.checkpoints.CheckpointError`` is a plain ``ValueError``: model code imports only torch.)"""


class VarsweepError(ValueError):
    """A bad input, named; raised before any compute is spent where the input can be checked that early."""
