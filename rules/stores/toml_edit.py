"""Edit the ``[[app]]`` tables of a TOML config in place, keeping everything else as it was.

The file store commits an edit by rewriting the config file, which an operator also edits by
hand: their comments, blank lines and key order must survive. tomlkit keeps the layout of what
is not touched; this module adds what it does not do by itself:

* only the keys of an app that changed are written (a rule added to ``allow`` is appended to
  the existing array, so the comments beside the other rules stay);
* text written above a table header (blank lines, a comment about the next app) belongs to that
  header, not to the table before it as tomlkit stores it. Before editing, such text is moved
  into the header's own leading text (which renders identically), so a key added to one app
  never lands under the comment about the next one, and deleting an app takes its own comment
  with it and leaves the next app's alone.

Pure text in, text out; the caller checks that the result reads back as intended.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

import tomlkit
from tomlkit.container import OutOfOrderTableProxy
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import (
    AoT,
    Array,
    Comment,
    InlineTable,
    Item,
    Null,
    Table,
    Trivia,
    Whitespace,
)
from tomlkit.toml_document import TOMLDocument

from rules.apps import App
from rules.document import app_to_data
from rules.edits import AppChange

__all__ = ["MULTILINE_RULES", "LayoutError", "edit_apps"]

MULTILINE_RULES: Final = 3
"""An ``allow`` list of more rules than this is written one rule per line."""

_REBUILD_COST: Final = 2_000_000
"""tomlkit re-indexes a whole array on every insert or delete: past this many item-steps an
edited ``allow`` array is written afresh (its inner comments are lost, the rest is kept)."""

_INDENT: Final = "    "

Body = list[tuple[Any, Item]]


class LayoutError(ValueError):
    """The document is not shaped as expected (no table for an app being edited, ``[rules]``
    that is not a table): the edit cannot be written in place."""


def edit_apps(
    text: str, changes: Sequence[AppChange], *, version: int, revoke: bool = False
) -> str:
    """``text`` with each change applied to its ``[[app]]`` table and ``[rules].version`` set
    to ``version`` (and ``[rules].revoke_version`` too with ``revoke``: in the same write as
    the edit, so a proxy that reads the edit also reads that it asked for revoke). Raises
    :class:`LayoutError`."""
    try:
        layout = _Layout(text)
        for change in changes:
            before, after = change.before, change.after
            if before is None:
                if after is not None:
                    layout.create(after)
            elif after is None:
                layout.delete(change.name)
            else:
                layout.update(before, after)
        layout.set_version(version)
        if revoke:
            layout.set_version(version, key="revoke_version")
        return layout.render()
    except TOMLKitError as error:  # a layout tomlkit cannot edit as asked
        raise LayoutError(str(error)) from None


class _Layout:
    """One parsed document, its header texts gathered, being edited."""

    def __init__(self, text: str) -> None:
        doc = tomlkit.parse(text)
        rendered = doc.as_string()
        eof = _gather_header_text(doc)
        if doc.as_string() + eof != rendered:  # a layout the gathering does not understand:
            doc, eof = tomlkit.parse(text), ""  # edit it as tomlkit has it
        self.doc: TOMLDocument = doc
        self.eof = eof  # text after the last value of the document

    def render(self) -> str:
        return self.doc.as_string() + self.eof

    # --- apps ------------------------------------------------------------------------------

    def _apps(self) -> Any:
        return self.doc.get("app")

    def _find(self, name: str) -> tuple[Any, int]:
        apps = self._apps()
        if isinstance(apps, AoT | Array):
            for index, table in enumerate(apps):
                if isinstance(table, Table | InlineTable) and table.get("name") == name:
                    return apps, index
        raise LayoutError(f"no [[app]] table named {name!r} to edit")

    def create(self, app: App) -> None:
        apps = self._apps()
        if isinstance(apps, Array) and len(apps) > 0:  # the operator's `app = [{...}]` style
            apps.append(_inline_app(app))
            return
        table = _new_table(app)
        table.trivia.indent = "\n"  # a blank line above the header
        if isinstance(apps, AoT):
            apps.append(table)
            return
        if apps is not None:  # `app = []`: becomes [[app]] tables at the end
            self.doc.remove("app")
        aot = tomlkit.aot()
        aot.append(table)
        self.doc.append("app", aot)

    def delete(self, name: str) -> None:
        apps, index = self._find(name)
        if isinstance(apps, Array):
            del apps[index]
            return
        table = apps[index]

        def remove() -> None:
            del apps[index]
            if len(apps) == 0:
                self.doc.remove("app")

        self._drop_header(table, remove)

    def update(self, before: App, after: App) -> None:
        apps, index = self._find(before.name)
        table = apps[index]
        old, new = app_to_data(before), app_to_data(after)
        if before.uids != after.uids:
            _put(table, "uids", _uids_item(new["uids"], table.get("uids")))
        _edit_rules(table, [r.text for r in before.allow], [r.text for r in after.allow])
        if before.mode != after.mode:
            _put(table, "mode", tomlkit.item(new["mode"]))
        for key in ("limits", "proxy_auth"):
            if old.get(key) != new.get(key):
                self._edit_subtable(table, key, old.get(key), new.get(key))

    def _edit_subtable(
        self, table: Any, key: str, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        current = table.get(key)
        if new is None:
            if isinstance(current, Table) and not current.is_super_table():
                self._drop_header(current, lambda: table.remove(key))
            elif key in table:
                del table[key]
            return
        if isinstance(current, Table):  # [app.limits] or limits.burst = ... : edit in place
            for name in [k for k in current if k not in new]:
                del current[name]
            for name, value in new.items():
                if old is None or old.get(name) != value or name not in current:
                    _put(current, name, tomlkit.item(value))
            return
        if isinstance(current, InlineTable):  # keep its key order; rebuilt, as deleting
            order = [k for k in current if k in new] + [k for k in new if k not in current]
            _put(table, key, _inline({name: new[name] for name in order}))
            return
        _put(table, key, _inline(new))

    # --- [rules].version -------------------------------------------------------------------

    def set_version(self, version: int, *, key: str = "version") -> None:
        rules = self.doc.get("rules")
        if rules is None:
            table = tomlkit.table()
            table.append(key, version)
            table.trivia.indent = "\n"
            self.doc.append("rules", table)
            return
        if not isinstance(rules, Table | InlineTable | OutOfOrderTableProxy):
            raise LayoutError("[rules] is not a table")
        _put(rules, key, tomlkit.item(version))

    # --- removing a table with a header ----------------------------------------------------

    def _drop_header(self, table: Table, remove: Any) -> None:
        """Remove ``table`` (by calling ``remove``) and the comment lines right above its
        header; other text above it stays where it was."""
        indent = table.trivia.indent
        own = indent[len(indent.rstrip(" \t")) :]  # the header's own indentation
        kept, _about_it = _split_leading_comments(indent[: len(indent) - len(own)])
        following = _next_header(self.doc, table)
        remove()
        if following is None:
            self.eof = _joined(kept, self.eof)
        else:
            following.trivia.indent = _joined(kept, following.trivia.indent)


# --- gathering the text above headers ---------------------------------------------------------


def _gather_header_text(doc: TOMLDocument) -> str:
    """Move the blank lines and comments written above each header into the header's leading
    text; return (and remove) the text after the document's last value."""
    pending: list[tuple[Body, int]] = []

    def take() -> str:
        text = "".join(body[index][1].as_string() for body, index in pending)
        for body, index in pending:
            body[index] = (None, Null())
        pending.clear()
        return text

    def header(table: Table) -> None:
        text = take()
        if text:
            table.trivia.indent = text + table.trivia.indent
        walk(table.value.body)

    def walk(body: Body) -> None:
        for index, (key, item) in enumerate(body):
            if key is None:
                if isinstance(item, Whitespace | Comment):
                    pending.append((body, index))
            elif isinstance(item, AoT):
                for table in item.body:
                    header(table)
            elif isinstance(item, Table):
                if item.is_super_table():  # no header of its own; its children may have
                    walk(item.value.body)
                else:
                    header(item)
            else:
                pending.clear()

    walk(doc.body)
    return take()


def _headers(body: Body) -> Iterator[Table]:
    """Every table that renders a header, in the order they are written."""
    for key, item in body:
        if key is None:
            continue
        if isinstance(item, AoT):
            for table in item.body:
                yield table
                yield from _headers(table.value.body)
        elif isinstance(item, Table):
            if not item.is_super_table():
                yield item
            yield from _headers(item.value.body)


def _next_header(doc: TOMLDocument, table: Table) -> Table | None:
    """The first header written after ``table`` and everything inside it."""
    inside = {id(table)} | {id(t) for t in _headers(table.value.body)}
    seen = False
    for candidate in _headers(doc.body):
        if candidate is table:
            seen = True
        elif seen and id(candidate) not in inside:
            return candidate
    return None


def _joined(before: str, after: str) -> str:
    """Two runs of text above a header (or at the end) put together, with no more blank
    lines between them than ``after`` starts with."""
    lines = before.splitlines(keepends=True)
    head, newline, _ = after.partition("\n")
    if not after or (newline and not head.strip()):
        while lines and not lines[-1].strip():
            lines.pop()
    return "".join(lines) + after


def _split_leading_comments(text: str) -> tuple[str, str]:
    """``text`` above a header as (what stays, the comment lines directly above the header)."""
    lines = text.splitlines(keepends=True)
    cut = len(lines)
    while cut > 0 and lines[cut - 1].lstrip().startswith("#"):
        cut -= 1
    return "".join(lines[:cut]), "".join(lines[cut:])


# --- values -----------------------------------------------------------------------------------


def _put(table: Any, key: str, value: Item) -> None:
    """Set ``key``: in place if it exists (keeping its comment), else after the last value,
    indented as the table's first key is."""
    if key in table:
        table[key] = value
    elif isinstance(table, Table):
        for _, item in table.value.body:
            if not isinstance(item, Whitespace | Comment | Null | Table | AoT):
                if not item.trivia.indent.strip(" \t"):
                    value.trivia.indent = item.trivia.indent
                break
        table.raw_append(key, value)  # not append: it indents from the header's leading text
    else:
        table.append(key, value)


def _array(values: Sequence[Any], *, multiline: bool) -> Array:
    """An array built in one go (tomlkit's per-item insert is quadratic)."""
    items: list[Item] = []
    for value in values:
        if multiline:
            items += [Whitespace("\n" + _INDENT), tomlkit.item(value), Whitespace(",")]
        else:
            if items:
                items.append(Whitespace(", "))
            items.append(tomlkit.item(value))
    if multiline and items:
        items.append(Whitespace("\n"))
    return Array(items, Trivia())


def _rules_array(texts: Sequence[str]) -> Array:
    return _array(texts, multiline=len(texts) > MULTILINE_RULES)


def _uids_item(uids: Sequence[str], like: Any) -> Array:
    """The uids, as integers where the file wrote its uids as integers."""
    as_ints = isinstance(like, Array) and len(like) > 0 and all(isinstance(v, int) for v in like)
    return _array([int(u) if as_ints and u.isdigit() else u for u in uids], multiline=False)


def _inline(data: dict[str, Any]) -> InlineTable:
    table = tomlkit.inline_table()
    for key, value in data.items():
        table.append(key, value)
    return table


def _new_table(app: App) -> Table:
    table = tomlkit.table()
    for key, value in app_to_data(app).items():
        if key == "allow":
            table.append(key, _rules_array(value))
        elif key == "uids":
            table.append(key, _array(value, multiline=False))
        elif isinstance(value, dict):
            table.append(key, _inline(value))
        else:
            table.append(key, value)
    return table


def _inline_app(app: App) -> InlineTable:
    table = tomlkit.inline_table()
    for key, value in app_to_data(app).items():
        if isinstance(value, list):
            table.append(key, _array(value, multiline=False))
        elif isinstance(value, dict):
            table.append(key, _inline(value))
        else:
            table.append(key, value)
    return table


def _edit_rules(table: Any, old: list[str], new: list[str]) -> None:
    """Turn the ``allow`` array from ``old`` into ``new`` (canonical rule texts), keeping the
    items (their spelling, their comments) of the rules that stay."""
    if old == new:
        return
    current = table.get("allow")
    if not isinstance(current, Array) or len(current) != len(old):
        _put(table, "allow", _rules_array(new))
        return
    drop: list[int] = []
    matched = 0
    for index, text in enumerate(old):
        if matched < len(new) and text == new[matched]:
            matched += 1
        else:
            drop.append(index)
    added = new[matched:]
    runs = _runs(drop)
    if (len(runs) + len(added)) * max(len(old), 1) > _REBUILD_COST:
        _put(table, "allow", _rules_array(new))
        return
    for start, stop in reversed(runs):
        del current[start:stop]
    for text in added:
        current.append(text)
    multiline = "\n" in current.as_string()
    if not multiline and len(current) > MULTILINE_RULES and not isinstance(table, InlineTable):
        current.multiline(True)


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted indexes as ``(start, stop)`` runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
