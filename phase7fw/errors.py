"""User-facing errors: the CLI prints them as one message and exits with code 2."""


class Phase7Error(Exception):
    """A problem with user input (recipe, data, checkpoint, plugin, CLI argument).

    The message is shown as-is, without a traceback, so it must name the problem and
    where it is.
    """

    exit_code = 2


class RecipeError(Phase7Error):
    """A recipe failed to load or validate; ``errors`` holds one line per problem."""

    def __init__(self, errors, source=None):
        self.errors = list(errors)
        self.source = source
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  {e}" for e in self.errors))


class CheckpointError(Phase7Error):
    """A checkpoint is missing, corrupt, unsafe or incompatible with the recipe."""


class TrainingAborted(Phase7Error):
    """Training stopped on purpose (too many non-finite steps in a row, non-finite weights):
    exit code 2 like any other refusal, with the path of the last good checkpoint."""
