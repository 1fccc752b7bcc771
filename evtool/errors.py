"""The library's own exceptions. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class EvtoolError(Exception):
    """Base class: a failure the user can act on; str() is the one-line message."""


class InvalidEvent(EvtoolError):
    """A line or object that is not a valid event (design section 2)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedJSON(InvalidEvent):
    """The text is not a JSON value."""


class ConfigError(EvtoolError):
    """A setting is missing or contradictory."""


class DatabaseUnavailable(EvtoolError):
    """PostgreSQL could not be reached, or was lost for longer than the retry window."""


class DatabaseError(EvtoolError):
    """PostgreSQL refused an operation for a reason that retrying will not fix."""


class SchemaBehind(EvtoolError):
    """The database's schema is older than this evtool's; a reader does not migrate it."""


class UnknownUser(EvtoolError):
    """No total is stored for this user."""


class JournalError(EvtoolError):
    """A journal file cannot be processed safely as it is (truncated, replaced, ambiguous)."""


class JournalChanged(JournalError):
    """The journal changed under a batch (overwritten, truncated): nothing of the batch was applied."""


class JournalLocked(EvtoolError):
    """Another `evtool serve` already writes this journal."""


class JournalWriteError(EvtoolError):
    """The journal could not be written (disk full, I/O error); nothing of the request was kept."""


class SourceError(EvtoolError):
    """The sender's input file cannot be read."""


class DeliveryFailed(EvtoolError):
    """Some events could not be delivered to the receiver."""
