"""The sandbox a template runs in. Templates are written by tenant admins, who are untrusted: a
template is checked when it is saved (and again when it is compiled) against an allow-list of what
Jinja may do here, and rendering stops at MAX_OUTPUT characters a part.

Why an allow-list and not only Jinja's sandbox: the sandbox blocks unsafe attributes (`__class__`)
and caps range(), but not CPU or memory — nested loops over range(), `'x' * 10**9`,
`'a'|center(10**9)`, `s|replace('', s)` each stall or swell a worker. What is allowed is all that
a notification needs: variables, `{% if %}`, one level of `{% for x in list_variable %}` (lists
are bounded), comparisons, `~`, and a few filters that grow nothing. No function or method calls,
no arithmetic but + and -, no macros, includes or `{% set %}` blocks.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.meta import find_undeclared_variables
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidInput

MAX_SOURCE = 64 * 1024  # characters of a subject, text or HTML template
MAX_SUBJECT_SOURCE = 2_000
MAX_NODES = 500  # Jinja nodes a part; compiling 500 takes ~50 ms, 9,000 (a 64 KB template) 1.5 s
MAX_LOOP_NODES = 60  # Jinja nodes in a loop's body: a loop runs at most MAX_LIST_ITEMS times
MAX_OUTPUT = 512 * 1024  # characters a part may render to (the message size limit is the next bound)
MAX_LIST_ITEMS = 100
MAX_STRING = 4_000  # characters of a string value given at submit
MAX_DATA = 64 * 1024  # characters of every value given at submit together
_CACHE_SIZE = 512

# Filters that neither call out nor grow their input beyond a constant factor, and run at C speed
# or near it: title, striptags and urlencode took 0.2-1 s for 60 uses on 64 K characters.
ALLOWED_FILTERS = frozenset({
    "e", "escape", "default", "d", "upper", "lower", "capitalize", "trim", "length", "count", "join", "first",
    "last", "int", "string", "abs", "round",
})  # fmt: skip
ALLOWED_TESTS = frozenset({"defined", "undefined", "none", "number", "string", "even", "odd", "true", "false"})
LOOP_ATTRIBUTES = frozenset({"index", "index0", "revindex", "revindex0", "first", "last", "length"})
_EXPRESSIONS = (nodes.Const, nodes.Name, nodes.Compare, nodes.Operand, nodes.And, nodes.Or, nodes.Not,
                nodes.Neg, nodes.Pos, nodes.Concat, nodes.Add, nodes.Sub, nodes.CondExpr, nodes.Filter,
                nodes.Test, nodes.TemplateData, nodes.Getattr, nodes.Getitem, nodes.Slice, nodes.Keyword,
                nodes.Tuple, nodes.List)  # fmt: skip
_STATEMENTS = (nodes.Template, nodes.Output, nodes.If, nodes.For)


class TemplateError(InvalidInput):
    """A template that may not be saved or rendered as given (field: the part, or data.<name>)."""


def _finalize(value: Any) -> Any:
    return "" if value is None else value  # an optional variable left out prints as nothing


def _environment(autoescape: bool) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=autoescape, finalize=_finalize, keep_trailing_newline=True,
        cache_size=0,
    )  # fmt: skip
    env.globals.clear()  # no range(), dict(), lipsum(), cycler(), …: nothing to call
    # `join` multiplies its input's length by up to 11 (a 10-character separator between every
    # character), and its output may be joined again: 8 joins of a 10-character constant are 1.9 G
    # characters, made by Jinja's constant folding when the template is compiled, or at render
    # from a variable — before any output reaches MAX_OUTPUT. So no filter may return more than
    # MAX_OUTPUT characters (a filter's error while folding leaves it to the render, which fails).
    env.filters = {name: _bounded(f) for name, f in env.filters.items() if name in ALLOWED_FILTERS}
    return env


class _TooLong(ValueError):
    """A filter's result longer than a part may render to."""


def _bounded(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja_pass_arg: the eval context is passed as before
    def bounded(*args: Any, **kwargs: Any) -> Any:
        value = f(*args, **kwargs)
        if isinstance(value, str) and len(value) > MAX_OUTPUT:
            raise _TooLong(f"a filter's result is longer than {MAX_OUTPUT:,} characters")
        return value

    return bounded


_PLAIN = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


def check(field: str, source: str, declared: Mapping[str, Any], *, limit: int = MAX_SOURCE) -> list[tuple[str, str]]:
    """The problems of one part's template (empty: it may be saved): its size, its syntax, what it
    does (the allow-list above), and variables it uses that the kind does not declare."""
    if not isinstance(source, str):
        return [(field, "is a string")]
    if len(source) > limit:
        return [(field, f"is at most {limit:,} characters (this is {len(source):,})")]
    if "\x00" in source:
        return [(field, "may not hold a NUL character")]
    env = _HTML if field == "html" else _PLAIN
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as e:
        return [(field, f"line {e.lineno}: {e.message}")]
    size = sum(1 for _ in tree.find_all(nodes.Node))
    if size > MAX_NODES:
        return [(field, f"is too elaborate: at most {MAX_NODES} template elements (this has {size:,})")]
    lists = {name for name, v in declared.items() if getattr(v, "type", None) == "list"}
    problems = [(field, p) for p in _refused(tree, lists)]
    if problems:
        return problems[:10]
    unknown = sorted(find_undeclared_variables(tree) - set(declared))
    if unknown:
        known = ", ".join(declared) or "none"
        return [(field, f"uses {', '.join(unknown)}, which this template does not declare (its variables: {known})")]
    return []


def _refused(tree: nodes.Template, lists: set[str]) -> list[str]:
    problems: list[str] = []

    def walk(node: nodes.Node, in_loop: bool) -> None:
        where = f"line {node.lineno}: " if getattr(node, "lineno", None) else ""
        if isinstance(node, nodes.For):
            # A loop's cost is its iterations times its body: at most MAX_LIST_ITEMS × MAX_LOOP_NODES
            # evaluations, each on one item (the lists themselves are not read inside).
            if in_loop:
                problems.append(f"{where}loops may not be nested")
            elif not (isinstance(node.iter, nodes.Name) and node.iter.name in lists) or node.recursive or node.test:
                which = f" ({', '.join(sorted(lists))})" if lists else "; this template has none"
                problems.append(f"{where}a loop goes over one list variable: {{% for item in name %}}{which}")
            elif (size := sum(1 for _ in node.find_all(nodes.Node))) > MAX_LOOP_NODES:
                problems.append(f"{where}a loop's body is at most {MAX_LOOP_NODES} template elements (this: {size})")
            else:
                for child in [*node.body, *node.else_]:
                    walk(child, True)
            return
        if in_loop and isinstance(node, nodes.Name) and node.name in lists:
            problems.append(f"{where}inside a loop, the list {node.name} itself may not be used")
        elif isinstance(node, nodes.Filter) and node.name not in ALLOWED_FILTERS:
            problems.append(f"{where}the filter {node.name!r} is not allowed here")
        elif isinstance(node, nodes.Test) and node.name not in ALLOWED_TESTS:
            problems.append(f"{where}the test {node.name!r} is not allowed here")
        elif isinstance(node, nodes.Getattr) and not (
            isinstance(node.node, nodes.Name) and node.node.name == "loop" and node.attr in LOOP_ATTRIBUTES
        ):
            problems.append(f"{where}attributes may not be read here, except loop.index and the like")
            return
        elif isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Const | nodes.Slice):
            problems.append(f"{where}an item is taken by a constant index only")
        elif isinstance(node, nodes.Filter | nodes.Test) and (node.dyn_args or node.dyn_kwargs):
            problems.append(f"{where}filters take plain arguments only")
        elif isinstance(node, nodes.Filter) and node.name == "join" and not _short_separator(node):
            # "abc"|join(sep) puts sep between every character: 4,000 × a 64 KB separator is 256 M.
            problems.append(f"{where}join takes a constant separator of at most 10 characters")
        elif isinstance(node, nodes.Const) and isinstance(node.value, int | float) and abs(node.value) > 10**6:
            problems.append(f"{where}numbers are at most 1,000,000 here")
        elif not isinstance(node, _STATEMENTS + _EXPRESSIONS):
            problems.append(f"{where}{_describe(node)} is not allowed in a notification template")
            return
        for child in node.iter_child_nodes():
            walk(child, in_loop)

    walk(tree, False)
    return problems


def _short_separator(node: nodes.Filter) -> bool:
    args = [*node.args, *(k.value for k in node.kwargs)]
    return all(isinstance(a, nodes.Const) and isinstance(a.value, str) and len(a.value) <= 10 for a in args)


def _describe(node: nodes.Node) -> str:
    names = {
        nodes.Call: "a function or method call", nodes.Mul: "'*'", nodes.Pow: "'**'", nodes.Div: "'/'",
        nodes.FloorDiv: "'//'", nodes.Mod: "'%'", nodes.Macro: "a macro", nodes.CallBlock: "a call block",
        nodes.Include: "an include", nodes.Extends: "extends", nodes.Import: "an import",
        nodes.FromImport: "an import", nodes.Assign: "{% set %}", nodes.AssignBlock: "{% set %}",
        nodes.FilterBlock: "a filter block", nodes.Block: "a block", nodes.With: "{% with %}",
        nodes.ScopedEvalContextModifier: "{% autoescape %}", nodes.Dict: "a dict",
    }  # fmt: skip
    return names.get(type(node), type(node).__name__)


class Compiled:
    """One part's template, checked and compiled (cached by its text)."""

    def __init__(self, field: str, source: str) -> None:
        env = _HTML if field == "html" else _PLAIN
        self.field = field
        self.template = env.from_string(source)

    def render(self, data: Mapping[str, Any]) -> str:
        """The output, or TemplateError when it would pass MAX_OUTPUT characters: rendered chunk
        by chunk, so an over-long output stops there rather than filling the memory."""
        size = 0
        chunks: list[str] = []
        out: Iterator[str] = self.template.generate(data)
        try:
            for chunk in out:
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateError([(self.field, f"renders to more than {MAX_OUTPUT:,} characters")])
                chunks.append(chunk)
        except (SecurityError, UndefinedError, TypeError, ValueError, ArithmeticError) as e:
            if isinstance(e, TemplateError):
                raise
            raise TemplateError(
                [(self.field, f"could not be rendered: {type(e).__name__}: {_short(str(e))}")]
            ) from None
        finally:
            close = getattr(out, "close", None)
            if close is not None:
                close()
        return "".join(chunks)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:199] + "…"


_compiled: dict[tuple[str, str, str], Compiled] = {}


def compiled(kind: str, field: str, source: str, declared: Mapping[str, Any]) -> Compiled:
    """The compiled template for `source`, checked once (TemplateError if it may not run), from a
    small cache keyed by its digest: a busy tenant's templates are compiled once per process."""
    key = (kind, field, hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest())
    found = _compiled.get(key)
    if found is not None:
        return found
    problems = check(field, source, declared, limit=MAX_SUBJECT_SOURCE if field == "subject" else MAX_SOURCE)
    if problems:
        raise TemplateError(problems)
    if len(_compiled) >= _CACHE_SIZE:
        _compiled.clear()
    made = _compiled[key] = Compiled(field, source)
    return made


def checked_data(declared: Mapping[str, Any], data: Mapping[str, Any] | None, *, types: Mapping[str, str],
                 required: set[str]) -> dict[str, Any]:  # fmt: skip
    """The values for a render: every required variable given, nothing undeclared, each value of
    its type and bounded; optional ones left out are None. TemplateError names every problem as
    data.<name>."""
    problems: list[tuple[str, str]] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TemplateError([("data", "is an object of the template's variables")])
    for name in declared:
        if name in required and data.get(name) is None:
            problems.append((f"data.{name}", "is required by this template"))
    known = ", ".join(declared) or "none"
    total = 0
    for name, value in data.items():
        field = f"data.{str(name)[:64]}"
        if name not in declared:
            problems.append((field, f"is not a variable of this template (its variables: {known})"))
            continue
        if value is None:
            continue
        problem, size = _value_problem(types.get(name, "string"), value)
        total += size
        if problem:
            problems.append((field, problem))
    if total > MAX_DATA:
        problems.append(("data", f"is at most {MAX_DATA:,} characters of values together"))
    if problems:
        raise TemplateError(problems)
    # An optional variable left out is None, printed as nothing; an optional list, empty (a loop
    # over it runs no times).
    values: dict[str, Any] = {}
    for name in declared:
        value = data.get(name)
        values[name] = ([] if types.get(name) == "list" else None) if value is None else value
    return values


def _value_problem(kind: str, value: Any) -> tuple[str | None, int]:
    if kind == "list":
        if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS:
            return f"is a list of at most {MAX_LIST_ITEMS} strings", 0
        size = 0
        for item in value:
            problem, n = _value_problem("string", item)
            if problem:
                return f"is a list of strings: an item {problem}", 0
            size += n
        return None, size
    if kind == "boolean":
        return (None, 1) if isinstance(value, bool) else ("is true or false", 0)
    if kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= 10**15
        return (None, 16) if ok and value == value else ("is a number", 0)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return "is a string", 0
    value = str(value)
    if len(value) > MAX_STRING:
        return f"is at most {MAX_STRING:,} characters", 0
    if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
        return "may not hold NUL or a lone surrogate", 0
    return None, len(value)
