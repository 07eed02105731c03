"""``egress rules ...``: operators read, edit and question the rule store from a shell.

Every command takes ``--config FILE`` (default ``/etc/egress/egress.toml``; the store it names:
the file's own ``[[app]]`` tables, or Redis with ``[rules].store = "redis"``) and ``--json``
(machine output on stdout; errors become one JSON object on stderr). Edits go through the
store's one validator and leave an audit record naming the OS user who ran the command.

Exit codes (scripts may rely on them):

  0  success (check: the connection would be allowed)
  1  check: the connection would be denied
  2  usage, config or invalid input: a bad rule, uids, limit, destination or import file
  3  no such app
  4  conflict: --if-match / --if-version no longer holds, the app exists already, the rule to
     remove is not there, or other writers kept committing first; nothing changed
  5  the store is unavailable (Redis down, file unreadable); nothing changed

Errors go to stderr as ``egress: ...`` lines, one per problem; with ``--json`` as one JSON
object ``{"error", "exit_code", "message", "problems"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import json
import os
import sys
import tempfile
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from egress import stores
from egress.config import DEFAULT_CONFIG_PATH, Config, load_config
from egress.config.reader import _syntax_problem
from egress.errors import EgressError
from rules.addresses import show
from rules.apps import App, Limits, Mode, UidRange, sandboxed_uids
from rules.document import (
    app_etag,
    app_summary,
    app_to_data,
    apps_from_data,
    limits_to_data,
    rule_set_to_data,
)
from rules.edits import (
    KEEP,
    AppChange,
    CreateApp,
    DeleteApp,
    Edit,
    EditConflictError,
    RemoveRules,
    ReplaceAll,
    UnknownAppError,
    UpdateApp,
    limits_from_pairs,
)
from rules.edits import AddRules as AddRulesEdit
from rules.model import Rule
from rules.parse import RuleSyntaxError, parse_rule
from rules.problems import InvalidRuleSetError, Problem, utf8_text, value_repr
from rules.reading import RejectedError
from rules.stores.base import Actor, Committed, RuleStore, StoreState
from rules.stores.errors import StoreConflictError, StoreError, StoreUnavailableError

if TYPE_CHECKING:
    from egress.checking import CheckResult

__all__ = ["Exit", "add_rules_commands", "exit_code_for"]


class Exit(IntEnum):
    """The exit codes of ``egress rules`` (the module docstring says what each means)."""

    OK = 0
    DENIED = 1
    INVALID = 2
    NOT_FOUND = 3
    CONFLICT = 4
    UNAVAILABLE = 5


EXIT_CODES_HELP: Final = """\
exit codes:
  0  success (check: allowed)        3  no such app
  1  check: denied                   4  conflict (--if-match/--if-version, exists, missing rule)
  2  usage, config or invalid input  5  store unavailable (Redis down, file unreadable)"""

_COMMAND_LINE: Final = "command line"
_HISTORY_DEFAULT: Final = 20
_LIMIT_KEYS: Final = tuple(field.name for field in dataclasses.fields(Limits))


class UsageError(EgressError):
    """Options that do not make a command (exit 2)."""


class InvalidInputError(EgressError):
    """Input that is wrong in several places at once; one message line per place (exit 2)."""


# The first matching class decides; order matters where classes nest (StoreError last of its
# kind, EgressError covers ConfigError and the usage errors above; `check` turns a
# DestinationError into an InvalidInputError, so egress.checking is imported only by `check`).
_EXIT_FOR: Final[tuple[tuple[type[BaseException], Exit, str], ...]] = (
    (UnknownAppError, Exit.NOT_FOUND, "not_found"),
    (EditConflictError, Exit.CONFLICT, "conflict"),
    (StoreConflictError, Exit.CONFLICT, "conflict"),
    (StoreUnavailableError, Exit.UNAVAILABLE, "unavailable"),
    (StoreError, Exit.UNAVAILABLE, "store_error"),
    (InvalidRuleSetError, Exit.INVALID, "invalid"),
    (RuleSyntaxError, Exit.INVALID, "invalid"),
    (EgressError, Exit.INVALID, "invalid"),
)


def exit_code_for(error: BaseException) -> Exit | None:
    """The exit code ``error`` means for ``egress rules``; ``None`` for a bug."""
    for kind, code, _ in _EXIT_FOR:
        if isinstance(error, kind):
            return code
    return None


def _error_kind(error: BaseException) -> str:
    return next((name for kind, _, name in _EXIT_FOR if isinstance(error, kind)), "error")


# --- the parser ------------------------------------------------------------------------------


def add_rules_commands(subparsers: Any) -> None:
    """Add ``rules`` with its subcommands to the ``egress`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        help=f"TOML config file, naming the store (default: {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument("--json", action="store_true", help="machine output (JSON on stdout)")
    rules = subparsers.add_parser(
        "rules",
        help="read and edit the rule store; check a destination",
        description=(__doc__ or "").replace("``", "`"),  # reST literals read as `x`
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = rules.add_subparsers(dest="rules_command", required=True)

    def command(name: str, text: str, handler: _Command) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(handler=_handler(handler))
        return parser

    command("list", "every app: uids, mode, rule count, limits, ETag; the store version", _list)
    show_ = command("show", "one app in full, its ETag and the store version", _show)
    show_.add_argument("app", metavar="APP")

    for name, handler, text in (
        ("add", _add, "add rules to an app (rules it has already are left as they are)"),
        ("remove", _remove, "remove rules from an app (each must be one of its rules)"),
    ):
        edit = command(name, text, handler)
        edit.add_argument("app", metavar="APP")
        edit.add_argument("rules", metavar="RULE", nargs="+", help="e.g. api.example.com:443")
        _write_options(edit)

    set_ = command("set", "change an app's uids, mode or limits; --create makes a new app", _set)
    set_.add_argument("app", metavar="APP")
    set_.add_argument("--uids", metavar="U,U-U", help="the app's uids, e.g. 10001,10005-10009")
    set_.add_argument("--mode", choices=[mode.value for mode in Mode])
    set_.add_argument(
        "--limit",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help=f"set a limit ({', '.join(_LIMIT_KEYS)}); KEY=none clears it; repeatable",
    )
    set_.add_argument("--create", action="store_true", help="make a new app (needs --uids)")
    _write_options(set_)

    delete = command("delete", "delete an app and its rules", _delete)
    delete.add_argument("app", metavar="APP")
    _write_options(delete)

    check_ = command(
        "check",
        "would APP be allowed to connect to HOST:PORT? (exit 0 allowed, 1 denied)",
        _check,
    )
    check_.add_argument("app", metavar="APP")
    check_.add_argument("destination", metavar="HOST:PORT", help="e.g. api.example.com:443")

    history = command("history", "the audit trail, newest first", _history)
    history.add_argument("app", metavar="APP", nargs="?", help="only records touching APP")
    history.add_argument(
        "--limit", type=_positive_int, default=_HISTORY_DEFAULT, help="records to show"
    )

    export = command("export", "write the whole rule set ([[app]] tables)", _export)
    export.add_argument("--format", choices=("toml", "json"), help="toml unless --json")
    export.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")

    import_ = command(
        "import",
        "replace every app with FILE's [[app]] tables, all or nothing (other sections ignored)",
        _import,
    )
    import_.add_argument("file", metavar="FILE", help="an egress config file or an export")
    import_.add_argument("--format", choices=("toml", "json"), help="default: from the suffix")
    import_.add_argument(
        "--dry-run", action="store_true", help="print what would change; change nothing"
    )
    import_.add_argument(
        "--if-version", type=_non_negative_int, metavar="N", help="only if the store is at N"
    )
    import_.add_argument("--revoke", action="store_true", help=_REVOKE_HELP)


_REVOKE_HELP: Final = "close open tunnels the new rules no longer allow"


def _write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revoke", action="store_true", help=_REVOKE_HELP)
    parser.add_argument(
        "--if-match", metavar="ETAG", help="only if the app's ETag is still ETAG ('*': it exists)"
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return int(text)


# --- running a command -----------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Session:
    args: argparse.Namespace
    config: Config
    store: RuleStore

    @property
    def json(self) -> bool:
        return bool(self.args.json)


_Command = Callable[[_Session], Awaitable[int]]


def _handler(command: _Command) -> Callable[[argparse.Namespace], int]:
    """The sync entry ``egress.cli`` calls: run ``command`` against the store the config
    names, and turn the errors operators cause into their exit codes and messages."""

    def handle(args: argparse.Namespace) -> int:
        store_name: list[str] = []
        try:
            return asyncio.run(_in_session(command, args, store_name))
        except Exception as error:
            code = exit_code_for(error)
            if code is None:
                raise
            _report_error(error, code, as_json=args.json, store=next(iter(store_name), None))
            return code

    return handle


async def _in_session(command: _Command, args: argparse.Namespace, store_name: list[str]) -> int:
    config = load_config(args.config)
    store = stores.open_store(config)
    store_name.append(store.name)
    try:
        return await command(_Session(args, config, store))
    finally:
        await store.aclose()


def _report_error(error: BaseException, code: Exit, *, as_json: bool, store: str | None) -> None:
    message = str(error)
    if isinstance(error, UnknownAppError):
        message += " (`egress rules list` shows the apps)"
    elif isinstance(error, StoreError) and store and store not in message:
        message = f"{store}: {message}"
    problems = error.problems if isinstance(error, InvalidRuleSetError) else ()
    if as_json:
        body = {
            "error": _error_kind(error),
            "exit_code": int(code),
            "message": message,
            "problems": [dataclasses.asdict(problem) for problem in problems],
        }
        print(json.dumps(body, ensure_ascii=False), file=sys.stderr)
        return
    for line in message.splitlines() or [type(error).__name__]:
        print(f"egress: {line}", file=sys.stderr)


def _emit(session: _Session, data: object, lines: Iterable[str]) -> None:
    if session.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        for line in lines:
            print(line)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last one is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


# --- reading ---------------------------------------------------------------------------------


def _uids_text(app: App) -> str:
    return ",".join(str(uids) for uids in app.uids)


def _limits_text(limits: Limits | None) -> str:
    if limits is None:
        return "-"
    return " ".join(f"{key}={_number(value)}" for key, value in limits_to_data(limits).items())


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _public(app: App) -> dict[str, Any]:
    """An app as shown to an operator: ``proxy_auth`` without its password hash."""
    data = app_to_data(app)
    if app.proxy_auth is not None:
        data["proxy_auth"] = {"username": app.proxy_auth.username}
    return data


def _app(state: StoreState, name: str) -> App:
    app = state.app(name)
    if app is None:
        raise UnknownAppError(name)
    return app


async def _list(session: _Session) -> int:
    state = await session.store.read()
    apps = state.rule_set.apps
    rows = [
        (
            app.name,
            _uids_text(app),
            app.mode.value,
            str(len(app.allow)),
            app_etag(app),
            _limits_text(app.limits),
        )
        for app in apps
    ]
    lines = _table(("APP", "UIDS", "MODE", "RULES", "ETAG", "LIMITS"), rows) if rows else []
    lines.append(f"{len(apps)} apps; store version {state.version} ({session.store.name})")
    data = {
        "version": state.version,
        "store": session.store.name,
        "apps": [app_summary(app) for app in apps],
    }
    _emit(session, data, lines)
    return Exit.OK


async def _show(session: _Session) -> int:
    state = await session.store.read()
    app = _app(state, session.args.app)
    etag = app_etag(app)
    lines = [
        f"app:     {app.name}",
        f"uids:    {_uids_text(app)}",
        f"mode:    {app.mode.value}",
        f"limits:  {_limits_text(app.limits)}",
    ]
    if app.proxy_auth is not None:
        lines.append(f"proxy_auth: username {app.proxy_auth.username!r}")
    lines.append(f"etag:    {etag}")
    lines.append(f"rules ({len(app.allow)}):")
    lines += [f"  {rule.text}" for rule in app.allow]
    lines.append(f"store version {state.version} ({session.store.name})")
    data = {"version": state.version, "etag": etag, "app": _public(app)}
    _emit(session, data, lines)
    return Exit.OK


async def _history(session: _Session) -> int:
    records = await session.store.history(session.args.app, session.args.limit)
    rows = [
        (
            str(record.version),
            _utc(record.at),
            f"{record.actor.name} ({record.actor.via} on {record.actor.host})",
            record.summary + (" [revoke]" if record.revoke else ""),
        )
        for record in records
    ]
    lines = _table(("VERSION", "TIME (UTC)", "WHO", "SUMMARY"), rows) if rows else []
    if not rows:
        about = f" touching {session.args.app!r}" if session.args.app else ""
        lines.append(f"no audit records{about} in {session.store.name}")
    _emit(session, {"records": [record.to_data() for record in records]}, lines)
    return Exit.OK


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _check(session: _Session) -> int:
    # Only check needs the policy and the resolver: the other commands start faster without.
    from egress.checking import DestinationError, check, parse_destination  # noqa: PLC0415

    try:
        host, port = parse_destination(session.args.destination)
    except DestinationError as error:
        raise InvalidInputError(str(error)) from None
    state = await session.store.read()
    app = _app(state, session.args.app)
    from egress.resolver import make_resolver  # noqa: PLC0415 - only when needed

    settings = session.config.resolver
    resolver = make_resolver(settings)
    try:
        result = await check(
            app,
            host,
            port,
            resolver=resolver,
            exceptions=session.config.security.special_exceptions,
            rules_version=state.version,
            timeout=max(5.0, settings.timeout * settings.attempts + 1.0),
        )
    finally:
        await resolver.aclose()
    verdict = result.verdict
    data = result.to_data()
    lines = [
        f"{_verdict_word(result)}: {app.name} -> {data['destination']}",
        f"  reason:    {verdict.reason.value}",
        f"  rule:      {verdict.rule or '-'}",
        f"  addresses: {', '.join(data['addresses']) or '-'}",
        f"  why:       {result.explain()}",
        f"  store version {state.version} ({session.store.name})",
    ]
    _emit(session, data, lines)
    return Exit.OK if result.allowed else Exit.DENIED


# --- edits -----------------------------------------------------------------------------------


async def _commit(session: _Session, edit: Edit | Callable[[StoreState], Edit]) -> Committed:
    args = session.args
    return await session.store.commit(
        edit,
        Actor.os_user(),
        if_match=getattr(args, "if_match", None),
        revoke=bool(getattr(args, "revoke", False)),
        dry_run=bool(getattr(args, "dry_run", False)),
    )


def _print_committed(session: _Session, committed: Committed, app: str | None = None) -> int:
    change = committed.change
    state = committed.state
    data: dict[str, Any] = {
        "version": state.version,
        "changed": change.changed and not committed.dry_run,
        "dry_run": committed.dry_run,
        "summary": change.summary(),
        "changes": [each.describe() for each in change.apps],
        "revoke": committed.record.revoke if committed.record else False,
    }
    if app is not None:
        after = state.app(app)
        data["etag"] = None if after is None else app_etag(after)
    if committed.dry_run:
        lines = [f"dry run: the store is at version {state.version}; this would:"]
        lines += _diff_lines(change.apps) or ["  change nothing"]
        lines.append("nothing was changed (dry run)")
    elif change.changed:
        lines = [f"version {state.version}: {change.summary()}"]
    else:
        lines = [f"no change; the store stays at version {state.version}"]
    _emit(session, data, lines)
    return Exit.OK


def _diff_lines(changes: Iterable[AppChange]) -> list[str]:
    """What each app would become, rule by rule, for an operator to read before importing."""
    lines = []
    for each in changes:
        record = each.describe()
        if each.before is None and each.after is not None:
            lines.append(
                f"  create {each.name}: uids {_uids_text(each.after)}, mode"
                f" {each.after.mode.value}, {_rules(len(each.after.allow))}"
            )
        elif each.after is None:
            had = 0 if each.before is None else len(each.before.allow)
            lines.append(f"  delete {each.name} (it had {_rules(had)})")
            continue
        else:
            lines.append(f"  change {each.name}:")
            before, after = record.get("before", {}), record.get("after", {})
            for key in sorted(before.keys() | after.keys()):
                lines.append(f"    {key}: {_field(before.get(key))} -> {_field(after.get(key))}")
        lines += [f"    + {text}" for text in record.get("rules_added", [])]
        if record.get("rules_added_not_shown"):
            lines.append(f"    + ... and {record['rules_added_not_shown']} more")
        lines += [f"    - {text}" for text in record.get("rules_removed", [])]
        if record.get("rules_removed_not_shown"):
            lines.append(f"    - ... and {record['rules_removed_not_shown']} more")
    return lines


def _rules(count: int) -> str:
    return "1 rule" if count == 1 else f"{count} rules"


def _field(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{key}={_field(item)}" for key, item in value.items())
    return str(value)


def _parse_rules(texts: Sequence[str]) -> tuple[Rule, ...]:
    """Every rule parsed, or every bad one reported (in the parser's words)."""
    rules, errors = [], []
    for text in texts:
        try:
            rules.append(parse_rule(text))
        except RuleSyntaxError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise InvalidInputError("\n".join(str(error) for error in errors))
    return tuple(rules)


async def _add(session: _Session) -> int:
    rules = _parse_rules(session.args.rules)
    committed = await _commit(session, AddRulesEdit(session.args.app, rules))
    return _print_committed(session, committed, session.args.app)


async def _remove(session: _Session) -> int:
    rules = _parse_rules(session.args.rules)
    committed = await _commit(session, RemoveRules(session.args.app, rules))
    return _print_committed(session, committed, session.args.app)


async def _delete(session: _Session) -> int:
    committed = await _commit(session, DeleteApp(session.args.app))
    return _print_committed(session, committed, session.args.app)


def _parse_uids(text: str) -> tuple[UidRange, ...]:
    """``10001,10005-10009`` as uid ranges; every bad item is a problem."""
    found, problems = [], []
    for item in text.split(","):
        try:
            found.append(sandboxed_uids(item.strip()))
        except RejectedError as rejected:
            problems.append(
                Problem(_COMMAND_LINE, "--uids", show(item), rejected.expected, rejected.hint)
            )
    if problems:
        raise InvalidRuleSetError(problems)
    return tuple(found)


def _parse_limits(pairs: Sequence[str]) -> dict[str, Any]:
    """``--limit KEY=VALUE`` items: numbers as numbers, ``none`` as ``None`` (clear), any other
    value as text for the limits reader to refuse with its own words."""
    values: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, equals, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not equals or not key:
            problems.append(
                Problem(
                    _COMMAND_LINE,
                    "--limit",
                    show(pair),
                    "KEY=VALUE such as burst=40 (KEY=none clears the limit)",
                )
            )
            continue
        if key not in _LIMIT_KEYS:
            near = difflib.get_close_matches(key, _LIMIT_KEYS, n=1)
            problems.append(
                Problem(
                    _COMMAND_LINE,
                    "--limit",
                    show(key),
                    f"one of {', '.join(_LIMIT_KEYS)}",
                    f"did you mean {near[0]!r}?" if near else None,
                )
            )
            continue
        values[key] = _limit_value(text)
    if problems:
        raise InvalidRuleSetError(problems)
    return values


def _limits(pairs: dict[str, Any], base: Limits | None) -> Limits | None:
    """``base`` with the ``--limit`` edits; problems name the option and the key."""
    try:
        return limits_from_pairs(pairs, base=base, source=_COMMAND_LINE)
    except InvalidRuleSetError as invalid:
        raise InvalidRuleSetError(
            # The reader's hints are about TOML spelling (quotes), not a command line's.
            Problem(_COMMAND_LINE, f"--limit {p.key.removeprefix('limits.')}", p.value, p.expected)
            for p in invalid.problems
        ) from None


def _limit_value(text: str) -> object:
    if text.lower() == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


async def _set(session: _Session) -> int:
    args = session.args
    name: str = args.app
    uids = None if args.uids is None else _parse_uids(args.uids)
    mode = None if args.mode is None else Mode(args.mode)
    pairs = _parse_limits(args.limit)
    edit: Edit | Callable[[StoreState], Edit]
    if args.create:
        if uids is None:
            raise UsageError(f"set {name} --create: give the new app's uids with --uids")
        limits = _limits(pairs, None)
        edit = CreateApp(_new_app(name, uids, mode or Mode.ENFORCE, limits))
    else:
        if uids is None and mode is None and not args.limit:
            raise UsageError(
                f"set {name}: nothing to change; give --uids, --mode or --limit"
                " (or --create to make a new app)"
            )

        def update(state: StoreState) -> Edit:
            app = _app(state, name)
            return UpdateApp(
                name,
                uids=KEEP if uids is None else uids,
                mode=KEEP if mode is None else mode,
                limits=_limits(pairs, app.limits) if args.limit else KEEP,
            )

        edit = update
    committed = await _commit(session, edit)
    return _print_committed(session, committed, name)


def _new_app(name: str, uids: tuple[UidRange, ...], mode: Mode, limits: Limits | None) -> App:
    try:
        return App(name=name, uids=uids, mode=mode, limits=limits)
    except InvalidRuleSetError as invalid:
        raise InvalidRuleSetError(
            Problem(
                _COMMAND_LINE,
                "APP" if problem.key == "name" else problem.key,
                problem.value,
                problem.expected,
                problem.hint,
            )
            for problem in invalid.problems
        ) from None


# --- export and import -----------------------------------------------------------------------


async def _export(session: _Session) -> int:
    args = session.args
    if args.json and args.format == "toml":
        raise UsageError("export: --json means --format json; give one or the other")
    fmt = args.format or ("json" if args.json else "toml")
    state = await session.store.read()
    data = rule_set_to_data(state.rule_set)
    if fmt == "json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = _toml_export(data, state, session.store.name)
    if args.output is None:
        sys.stdout.write(text)
        return Exit.OK
    _write_atomically(Path(args.output), text)
    print(
        f"exported {len(state.rule_set.apps)} apps (store version {state.version})"
        f" to {args.output}",
        file=sys.stderr if args.json else sys.stdout,
    )
    return Exit.OK


def _toml_export(data: dict[str, Any], state: StoreState, store: str) -> str:
    """``[[app]]`` tables as a config file has them: limits inline, long rule lists one per
    line, and a header saying where and when they came from."""
    import tomlkit  # noqa: PLC0415 - only export writes TOML

    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"egress rules export: store version {state.version} of {store}"))
    doc.add(tomlkit.comment(f"exported {_utc(datetime.now(tz=UTC).timestamp())}"))
    doc.add(tomlkit.comment("load with: egress rules import THIS_FILE --config CONFIG"))
    tables = tomlkit.aot()
    for app in data["app"]:
        table = tomlkit.table()
        for key, value in app.items():
            if key == "allow":
                rules = tomlkit.array()
                rules.extend(value)
                table.add(key, rules.multiline(len(value) > 1))
            elif isinstance(value, dict):
                inline = tomlkit.inline_table()
                inline.update(value)
                table.add(key, inline)
            else:
                table.add(key, value)
        tables.append(table)
    doc.add("app", tables)
    return tomlkit.dumps(doc)


def _write_atomically(path: Path, text: str) -> None:
    """A half-written export never replaces a good one."""
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path())
    except OSError as error:
        raise EgressError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        raise EgressError(f"cannot write {path}: {error.strerror or error}") from None


def _read_import(path: Path, fmt: str | None) -> dict[str, Any]:
    """The ``app`` list of an import file, as ``{"app": [...]}``; file problems name it."""
    source = str(path)
    fmt = fmt or ("json" if path.suffix.lower() == ".json" else "toml")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise EgressError(f"cannot read {source}: {error.strerror or error}") from None
    text = utf8_text(raw, source)
    data: object
    try:
        data = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except json.JSONDecodeError as error:
        lines = text.splitlines()
        found = lines[error.lineno - 1].strip() if error.lineno <= len(lines) else ""
        where = f"line {error.lineno}, column {error.colno}"
        raise InvalidRuleSetError(
            [Problem(source, where, value_repr(found), "valid JSON", error.msg)]
        ) from None
    except tomllib.TOMLDecodeError as error:
        # The config reader's wording, so a broken import reads like a broken config.
        raise InvalidRuleSetError([_syntax_problem(source, text, str(error))]) from None
    except RecursionError:
        raise InvalidRuleSetError(
            [Problem(source, "", "values nested too deeply", f"valid {fmt.upper()}")]
        ) from None
    if not isinstance(data, dict):
        raise InvalidRuleSetError(
            [Problem(source, "", type(data).__name__, 'an object with an "app" list')]
        )
    if "app" not in data:
        raise InvalidRuleSetError(
            [
                Problem(
                    source,
                    "app",
                    "nothing",
                    "[[app]] tables",
                    "importing no apps would delete every app; write app = [] to mean that",
                )
            ]
        )
    return {"app": data["app"]}


async def _import(session: _Session) -> int:
    args = session.args
    path = Path(args.file)
    rule_set = apps_from_data(_read_import(path, args.format), version=0, source=str(path))
    store = session.store
    committed = await store.commit(
        ReplaceAll(rule_set),
        Actor.os_user(),
        if_match=None if args.if_version is None else str(args.if_version),
        revoke=args.revoke,
        dry_run=args.dry_run,
    )
    if not committed.dry_run and committed.change.changed and not session.json:
        for line in _diff_lines(committed.change.apps):
            print(line)
    return _print_committed(session, committed)


def _verdict_word(result: CheckResult) -> str:
    """``allowed``, ``denied`` (the rules said no) or ``failed`` (no decision could be made:
    the name did not resolve, the lookup timed out); exit 1 for both of the last two."""
    if result.allowed:
        return "allowed"
    return "denied" if result.verdict.decision.value == "denied" else "failed"
