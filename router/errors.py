"""The router's error taxonomy.

Every refusal carries a stable ``code`` (what scripts branch on) and a
``message`` (what a person reads).  The control socket sends both back as
``{"code": ..., "message": ...}``; the data path turns its own errors into
JSON answers with the HTTP status they carry.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class: a refusal with a code and a message."""

    code = "ERROR"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class RouteError(RouterError):
    """The caller asked for a route change that the rules refuse.

    The route table is untouched when this is raised.  ``index`` is set by
    ``batch`` to the position of the refused operation.
    """

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(message, code)
        self.index = index

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.index is not None:
            out["index"] = self.index
        return out


class StoreError(RouterError):
    """The durable store could not be opened, read or written."""

    code = "STORE_ERROR"
