"""Which address the service listens on and which Host headers it answers.

The search is open by default, so a page on another site could reach a loopback service through DNS
rebinding (its own name re-pointed at 127.0.0.1): the browser sends that site's name in the Host header.
The service answers only the loopback names, the address it listens on, and names the operator allows
(`xbt serve --allowed-host`). Listening on a non-loopback address needs an explicit `--expose`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from xbt.errors import InputError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_ADDRESSES = {"0.0.0.0", "::", ""}


def is_loopback(host: str) -> bool:
    """True for `localhost` and any loopback address (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_header_form(host: str) -> str:
    """A listening address as it appears in a Host header (an IPv6 address in brackets)."""
    name = host.strip().lower()
    try:
        return f"[{name.strip('[]')}]" if ipaddress.ip_address(name.strip("[]")).version == 6 else name
    except ValueError:
        return name


def check_listen_host(host: str, expose: bool) -> None:
    """Refuse a non-loopback address unless the operator said `--expose`."""
    if not is_loopback(host) and not expose:
        raise InputError(
            f"--host {host} would make the service reachable from other machines, where anyone who reaches it may "
            "search the gallery and view its thumbnails (and, with the token, write). If that is what you want, add "
            "--expose (and consider --closed-read with a token, and --allowed-host NAME for the names clients use); "
            "otherwise leave --host at 127.0.0.1")


def allowed_hosts(listen_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host header names the service answers: the loopback names, the address it listens on (unless a
    wildcard such as 0.0.0.0, which no client sends), and the operator's `--allowed-host` names ("*" for any)."""
    names = list(LOOPBACK_HOSTS)
    if listen_host.strip().strip("[]") not in _WILDCARD_ADDRESSES:
        names.append(_host_header_form(listen_host))
    for name in extra:
        name = name.strip().lower()
        if not name or ("*" in name and name != "*" and not (name.startswith("*.") and "*" not in name[1:])):
            raise InputError(f"--allowed-host {name!r}: give a host name or address, '*.example.org', or '*' for any")
        names.append(_host_header_form(name))
    return tuple(dict.fromkeys(names))
