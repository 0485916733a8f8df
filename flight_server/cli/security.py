"""`lclstream token | user | login | logout | certs`: the security side of the command line."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys
from pathlib import Path

from flight_server import config
from flight_server.cli.common import DEFAULT_SERVER


def duration(text: str) -> int:
    """'8h', '30m', '7d', '90s' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        seconds = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 8h, 30m, 7d)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return seconds


def _globs(values: list[str] | None) -> list[str]:
    """--read 'tmox4*,xpp*' --read cxi* -> ['tmox4*', 'xpp*', 'cxi*']"""
    return [g for v in values or [] for g in v.split(",") if g]


def _grants(args: argparse.Namespace):
    from flight_server.security.grants import Grants

    return Grants.build(_globs(args.read), _globs(args.write), _globs(args.admin))


def _settings(args: argparse.Namespace) -> config.Settings:
    return config.load(args.config, {"data": args.data, "state_dir": args.state_dir})


def _read_password(args: argparse.Namespace, confirm: bool) -> str:
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != password:
        raise ValueError("the passwords differ")
    return password


def cmd_token_create(args: argparse.Namespace) -> int:
    from flight_server.security.assembly import minter_for

    grants = _grants(args)
    if not grants.to_claim():
        raise ValueError("a token without grants can read nothing: add --read/--write/--admin")
    token = minter_for(_settings(args)).mint(args.sub, grants, args.ttl)
    print(token)
    return 0


def cmd_token_narrow(args: argparse.Namespace) -> int:
    from clients import connect

    read, write, admin = _globs(args.read), _globs(args.write), _globs(args.admin)
    if not (read or write or admin):
        raise ValueError("a token without grants can read nothing: add --read/--write/--admin")
    with connect(args.server, token=args.token, tls_root_certs=args.tls_ca,
                 cert_chain=args.tls_cert, private_key=args.tls_key) as client:
        print(client.narrow_token(read, write, admin, args.ttl))
    return 0


def _users(args: argparse.Namespace):
    """The users file of a single server, or a cluster's users (its --state-url)."""
    settings = config.load(args.config, {"data": args.data, "state_dir": args.state_dir,
                                         "state_url": args.state_url})
    if settings.state_url:
        from flight_server.cluster.state import ClusterState
        from flight_server.cluster.users import UsersTable

        state = ClusterState(settings.state_url)
        state.create()
        return UsersTable(state)
    from flight_server.security.users import UsersFile

    return UsersFile(settings.users_path())


def cmd_user_add(args: argparse.Namespace) -> int:
    users = _users(args)
    users.add(args.name, _read_password(args, confirm=True), _grants(args))
    print(f"user '{args.name}' saved in {users.path} (grants: {_grants(args).describe()})")
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    users = _users(args)
    users.remove(args.name)
    print(f"user '{args.name}' removed from {users.path}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    for user in _users(args).users().values():
        print(f"{user.name}\t{user.grants.describe()}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from clients import connect, credentials

    username = args.username or input("user name: ")
    password = _read_password(args, confirm=False)
    tls = {"tls_root_certs": args.tls_ca, "cert_chain": args.tls_cert,
           "private_key": args.tls_key}
    token = credentials.login(args.location, username, password, **tls)
    credentials.store_token(args.location, token)
    with connect(args.location, token, **tls) as client:
        who = client.whoami()
    until = dt.datetime.fromtimestamp(who["expires"], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"logged in to {args.location} as {who['subject']} until {until}; token kept in "
          f"{credentials.keyring_description()}")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from clients import credentials

    found = credentials.forget_token(args.location)
    print(f"forgot the token for {args.location}" if found
          else f"no token was stored for {args.location}")
    return 0


def cmd_certs_make(args: argparse.Namespace) -> int:
    from flight_server.security import certs

    hosts = tuple(args.host or certs.DEFAULT_HOSTS)
    paths = certs.make(Path(args.dir), hosts, client_name=args.client_name)
    for role, path in paths.items():
        print(f"{role:12} {path}")
    print(f"\nserve:   lclstream serve --tls-cert {paths['server_cert']} --tls-key "
          f"{paths['server_key']} --tls-client-ca {paths['ca']}\n"
          f"connect: connect('grpc+tls://localhost:8815', tls_root_certs='{paths['ca']}', "
          f"cert_chain='{paths['client_cert']}', private_key='{paths['client_key']}')")
    return 0


def _server_state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="the server's data root (default demo-data)")
    p.add_argument("--state-dir", type=Path, help="the server's state dir "
                   "(default DATA/.lclstream)")
    p.add_argument("--config", type=Path, help="the server's TOML settings file")


def _user_options(p: argparse.ArgumentParser) -> None:
    _server_state_options(p)
    p.add_argument("--state-url", metavar="URL", help="a cluster's shared state "
                   "(postgresql://...): its users, rather than the state dir's users.json")


def _grant_options(p: argparse.ArgumentParser) -> None:
    for right, what in (("read", "read"), ("write", "push live data to"),
                        ("admin", "administer (implies read and write)")):
        p.add_argument(f"--{right}", action="append", metavar="GLOB",
                       help=f"experiments to {what}: names or globs, comma-separated, repeatable")


def add_tls_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", type=Path, help="CA bundle (PEM) that signed the server's cert")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client certificate's private key (PEM)")


def register(sub: argparse._SubParsersAction, client_arguments) -> None:
    token = sub.add_parser("token", help="issue tokens signed by this server: create (admins, "
                           "with the server's state), narrow (anyone, over the wire)")
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="print a new token")
    create.add_argument("--sub", required=True, help="who the token is for")
    create.add_argument("--ttl", type=duration, default="8h",
                        help="lifetime, e.g. 8h, 30m, 7d (default 8h)")
    _grant_options(create)
    _server_state_options(create)
    create.set_defaults(func=cmd_token_create)
    narrow = tsub.add_parser("narrow", help="print a token with a subset of your grants, to "
                             "delegate (e.g. one experiment for one hour)")
    narrow.add_argument("--server", default=DEFAULT_SERVER)
    narrow.add_argument("--ttl", type=duration, help="lifetime, e.g. 1h, 30m (default: the "
                        "server's token_ttl); never beyond your own token's expiry")
    _grant_options(narrow)
    client_arguments(narrow)
    narrow.set_defaults(func=cmd_token_narrow)

    user = sub.add_parser("user", help="manage password-login users (admins)")
    usub = user.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="add a user, or replace their password and grants")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input instead of prompting")
    _grant_options(add)
    _user_options(add)
    add.set_defaults(func=cmd_user_add)
    remove = usub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    _user_options(remove)
    remove.set_defaults(func=cmd_user_remove)
    lst = usub.add_parser("list", help="list users and their grants")
    _user_options(lst)
    lst.set_defaults(func=cmd_user_list)

    login = sub.add_parser("login", help="log in with a password; keeps the token in the keyring")
    login.add_argument("location", help="e.g. grpc+tls://flight.example.org:8815")
    login.add_argument("-u", "--username")
    login.add_argument("--password-stdin", action="store_true")
    add_tls_client_options(login)
    login.set_defaults(func=cmd_login)

    logout = sub.add_parser("logout", help="forget the token kept for a server")
    logout.add_argument("location")
    logout.set_defaults(func=cmd_logout)

    certs = sub.add_parser("certs", help="throw-away certificates for trying TLS locally")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    make = csub.add_parser("make", help="write a CA, a server and a client certificate")
    make.add_argument("dir")
    make.add_argument("--host", action="append",
                      help="server host name or address (repeatable; default localhost, "
                           "127.0.0.1, ::1)")
    make.add_argument("--client-name", default="alice",
                      help="the client certificate's identity (default alice)")
    make.set_defaults(func=cmd_certs_make)
