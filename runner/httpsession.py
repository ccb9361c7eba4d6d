"""An HTTP client's aiohttp session: the one it was given, or its own, made on first use and
closed with the client (`close`, or the end of an `async with` block)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import aiohttp


class SessionHolder:
    def __init__(self, session: aiohttp.ClientSession | None) -> None:
        self._session = session
        self._own_session = session is None  # a session given by the caller is the caller's to close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
