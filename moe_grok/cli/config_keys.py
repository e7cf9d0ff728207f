"""Every key of a config file with its default and its help: the trailing comment where the key is declared.

A config file declares a key with a comment on its line, in one of three forms:

    config.train = ml_collections.ConfigDict(dict(
        steps=2000,  # optimizer steps                     -> train.steps
    ))
    config.analysis.batch_size = 1024  # samples per ...   -> analysis.batch_size
    config.analysis = analysis_config()                    -> analysis.<field>: the comment of each field
                                                              of the dataclass that analysis_config builds

Comment-only lines right after a commented one-line assignment continue its help. A config built
on another (`config_module(directory, "toy_grokking")`) declares that one's keys too: the files a
config names are read first, and a key's first declaration is its help. A key's help is that of the
longest dotted tail of its path that some file declares (`arms.mixture.task.p` -> `task.p`), so a
config nested in another keeps its keys' help.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import os
import tokenize

import ml_collections

from moe_grok import configs

_SECTION_CALLS = ("ConfigDict", "dict")


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of a config: its dotted path, its default value and its help ("" where undeclared)."""

    path: str
    default: object
    help: str


def _comments(source: str) -> dict[int, str]:
    """{line number: the text of the comment on that line}."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def _attribute_path(node: ast.expr) -> list[str] | None:
    """`config.a.b` -> ["a", "b"] (the path below the root variable); None for other targets."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1] if isinstance(node, ast.Name) and names else None


def _call_name(node: ast.expr) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _dataclass_field_help(module_name: str, function_name: str) -> dict[str, str]:
    """{field: help} of the dataclasses of `module_name` that its function `function_name` names."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return {}
    with open(spec.origin) as f:
        source = f.read()
    tree, comments = ast.parse(source), _comments(source)
    function = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function_name),
                    None)
    if function is None:
        return {}
    named = {node.id for node in ast.walk(function) if isinstance(node, ast.Name)}
    fields = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in named:
            for statement in node.body:
                if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                        and statement.lineno in comments):
                    fields.setdefault(statement.target.id, comments[statement.lineno])
    return fields


class _Declarations:
    """The help of every key that a set of config files declares, by dotted path below each file's variables."""

    def __init__(self):
        self.help: dict[str, str] = {}
        self._read: set[str] = set()

    def read_config_file(self, file: str) -> None:
        """Declarations of `file`, after those of the config files beside it that it names."""
        file = os.path.abspath(file)
        if file in self._read:
            return
        self._read.add(file)
        with open(file) as f:
            source = f.read()
        tree = ast.parse(source)
        directory = os.path.dirname(file)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                neighbour = os.path.join(directory, f"{node.value}.py")
                if os.path.isfile(neighbour):
                    self.read_config_file(neighbour)
        imported = {alias.asname or alias.name: node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 for alias in node.names}
        self._read_statements(tree, source, imported)

    def _declare(self, path: list[str], text: str) -> None:
        if text:
            self.help.setdefault(".".join(path), text)

    def _read_statements(self, tree: ast.Module, source: str, imported: dict[str, str]) -> None:
        comments = _comments(source)
        lines = source.splitlines()
        assignments = sorted((node for node in ast.walk(tree) if isinstance(node, ast.Assign)),
                             key=lambda node: node.lineno)  # in source order: a file's first declaration wins
        for node in assignments:
            if len(node.targets) != 1:
                continue
            path = _attribute_path(node.targets[0])
            if path is None:
                continue
            text = comments.get(node.lineno, "")
            if text and node.end_lineno == node.lineno:
                following = node.lineno  # comment-only lines below continue the help
                while following < len(lines) and lines[following].strip().startswith("#"):
                    following += 1
                    text += " " + comments[following]
            self._declare(path, text)
            self._read_value(path, node.value, comments, imported)

    def _read_value(self, path: list[str], value: ast.expr, comments: dict[int, str],
                    imported: dict[str, str]) -> None:
        name = _call_name(value)
        if name in _SECTION_CALLS:
            for argument in value.args:  # ConfigDict(dict(...))
                self._read_value(path, argument, comments, imported)
            for keyword in value.keywords:
                if keyword.arg is not None:
                    self._declare([*path, keyword.arg], comments.get(keyword.value.end_lineno, ""))
                    self._read_value([*path, keyword.arg], keyword.value, comments, imported)
        elif name in imported and isinstance(value.func, ast.Name):  # a section built by a library function
            for field, text in _dataclass_field_help(imported[name], name).items():
                self._declare([*path, field], text)

    def help_of(self, key: str) -> str:
        """The help of the longest dotted tail of `key` declared ("" where none is)."""
        parts = key.split(".")
        for start in range(len(parts)):
            text = self.help.get(".".join(parts[start:]))
            if text:
                return text
        return ""


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def config_keys(name_or_path: str) -> list[ConfigKey]:
    """Every leaf key of a shipped config (by name) or a config file (by path), sorted by path."""
    file = configs.path(name_or_path)
    declarations = _Declarations()
    declarations.read_config_file(file)
    return [ConfigKey(path, value, declarations.help_of(path)) for path, value in _leaves(configs.load(file))]


def format_keys(keys: list[ConfigKey]) -> str:
    """One line per key: `path = default  # help`, the comments aligned."""
    assignments = [f"{key.path} = {key.default!r}" for key in keys]
    width = min(max(map(len, assignments), default=0), 72)
    return "\n".join(f"{assignment:<{width}}  # {key.help}" for assignment, key in zip(assignments, keys, strict=True))
