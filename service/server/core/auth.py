"""Who is calling: the API keys a server accepts, each with a name, and which of them are admins.

``--api-key`` alone is one key, named ``default``, that sees everything: exactly the single-key server
of before. ``--api-keys-file`` adds named keys (TOML, so names and keys need no escaping)::

    [[keys]]
    name = "alice"
    key = "sk-alice-…"

    [[keys]]
    name = "ops"
    key = "sk-ops-…"
    admin = true

A job belongs to the key that submitted it: another key's holder gets 404 for it, as if it did not
exist (a 403 would confirm the id); an admin key sees every job. With no key at all nothing is guarded
and every caller is an anonymous admin, as before.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.settings import Settings

#: The name ``--api-key`` gets; jobs submitted with it are counted under it.
DEFAULT_KEY_NAME = "default"
#: The name jobs get when the server has no key (``emu35_jobs_submitted_total{key="anonymous"}``).
ANONYMOUS = "anonymous"
#: A key name is a metrics label and a column value: short, plain.
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A key is sent as a bearer token, so it is one (RFC 6750's token68), and long enough not to be guessed.
KEY = re.compile(r"^[A-Za-z0-9._~+/-]{16,}=*$")


class ApiKeysError(ValueError):
    """The keys file cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the name of its key (``None`` when the server has no key) and whether
    it may see every job."""

    name: str | None
    admin: bool

    @property
    def label(self) -> str:
        return self.name or ANONYMOUS

    def may_see(self, submitted_by: str | None) -> bool:
        return self.admin or (submitted_by is not None and submitted_by == self.name)


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=KEY_NAME.pattern)
    key: str = Field(pattern=KEY.pattern, description="16 or more of A-Z a-z 0-9 . _ ~ + / - (a bearer token)")
    admin: bool = False


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[_KeyEntry] = Field(min_length=1)


@dataclass(frozen=True)
class _Key:
    name: str
    secret: bytes
    admin: bool


class ApiKeys:
    """The accepted keys. :meth:`identify` compares a presented token with every key in constant time."""

    def __init__(self, keys: list[_Key]) -> None:
        self._keys = keys

    @property
    def required(self) -> bool:
        """Whether a key must be sent at all."""
        return bool(self._keys)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self._keys]

    def identify(self, token: str | None) -> Caller | None:
        """The caller ``token`` makes, or None when it is no key of this server."""
        if not self._keys:
            return Caller(None, admin=True)
        given = (token or "").encode()
        found = None
        for k in self._keys:  # every key is compared, so the time does not tell which one came close
            if secrets.compare_digest(given, k.secret) and found is None:
                found = k
        return Caller(found.name, found.admin) if found is not None else None


def read_keys_file(path: Path) -> list[_Key]:
    """The keys of ``path``; :class:`ApiKeysError` naming what is wrong (never echoing a key)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ApiKeysError(f"{path}: cannot be read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ApiKeysError(f"{path}: not TOML ({exc})") from None
    try:
        parsed = _KeysFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiKeysError(f"{path}: {where}: {err['msg']}") from None
    return [_Key(e.name, e.key.encode(), e.admin) for e in parsed.keys]


def load_api_keys(settings: Settings) -> ApiKeys:
    """The keys of ``--api-key`` and ``--api-keys-file``; names and keys must be unique."""
    keys: list[_Key] = []
    if settings.api_key is not None:
        keys.append(_Key(DEFAULT_KEY_NAME, settings.api_key.get_secret_value().encode(), admin=True))
    if settings.api_keys_file is not None:
        keys += read_keys_file(settings.api_keys_file)
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ApiKeysError(f"the key name {dup!r} is given twice (--api-key is named {DEFAULT_KEY_NAME!r})")
    if len({k.secret for k in keys}) != len(keys):
        raise ApiKeysError("two key names share one key")
    return ApiKeys(keys)
