"""User-facing errors: one line, shown without a traceback, non-zero exit."""


class SpecliError(Exception):
    """An error whose message is meant for the user as it is."""


class NoChatTemplate(SpecliError):
    """A model with no chat template was given messages.  The message suits generate
    (`--raw`); chat and the server, which have no such flag, say their own way out."""

    def __init__(self, model: str) -> None:
        super().__init__(f"{model} has no chat template; use --raw to send the prompt as is")
        self.model = model
