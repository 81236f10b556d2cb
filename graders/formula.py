"""The `multi` grader's `calculate_output` language: a tokenizer and a recursive-descent parser.

Exactly what the platform documents (reference §2.6) and nothing else: numbers, the sub-graders'
names, `+ - * /`, `^` (power, right-associative), parentheses and the functions
`min max abs floor ceil exp sqrt log` (`log` is the natural log). No Python `eval`, no attribute
access, no comparisons. `-2^2` is `-(2^2)`, as in mathematics.

    >>> Formula.parse("0.5 * name + 0.5 * max(email, 0)").evaluate({"name": 1.0, "email": 0.0})
    0.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass


MAX_FORMULA_CHARS = 2_000
MAX_NESTING = 50  # parentheses, calls, unary signs and powers inside one another
MAX_TREE_DEPTH = 200  # operations chained one inside another (a + b + c + ... counts each +)


class FormulaError(ValueError):
    """A formula that does not parse, or whose value cannot be computed (division by zero, ...)."""


def _sqrt(x: float) -> float:
    if x < 0:
        raise FormulaError(f"sqrt of a negative number ({x:g})")
    return math.sqrt(x)


def _log(x: float) -> float:
    if x <= 0:
        raise FormulaError(f"log of a non-positive number ({x:g})")
    return math.log(x)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        raise FormulaError(f"exp({x:g}) overflows") from None


def _pow(a: float, b: float) -> float:
    try:
        return math.pow(a, b)
    except OverflowError:
        raise FormulaError(f"{a:g} ^ {b:g} overflows") from None
    except ValueError:
        raise FormulaError(f"{a:g} ^ {b:g} is not a real number") from None


# name -> (function, minimum arguments, maximum arguments or None)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "min": (min, 1, None),
    "max": (max, 1, None),
    "abs": (abs, 1, 1),
    "floor": (lambda x: float(math.floor(x)), 1, 1),
    "ceil": (lambda x: float(math.ceil(x)), 1, 1),
    "exp": (_exp, 1, 1),
    "sqrt": (_sqrt, 1, 1),
    "log": (_log, 1, 1),
}

_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[-+*/^(),]))"
)

# AST nodes are tuples: ("num", v) ("var", name) ("neg", x) ("bin", op, a, b) ("call", name, [args])
Node = tuple


@dataclass(frozen=True)
class Token:
    kind: str  # num | name | op | end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            bad = text[pos:].lstrip()[0]
            at = len(text) - len(text[pos:].lstrip())
            raise FormulaError(f"unexpected character {bad!r} at position {at}")
        kind = m.lastgroup
        tokens.append(Token(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def nest(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise FormulaError(f"the formula nests deeper than {MAX_NESTING} levels at position {tok.pos}")

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            found = repr(tok.text) if tok.kind != "end" else "the end of the formula"
            raise FormulaError(f"expected {text!r} at position {tok.pos}, found {found}")

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise FormulaError("the formula is empty")
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise FormulaError(f"unexpected {tok.text!r} at position {tok.pos}")
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek().text in ("+", "-") and self.peek().kind == "op":
            op = self.take().text
            node = ("bin", op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek().text in ("*", "/") and self.peek().kind == "op":
            op = self.take().text
            node = ("bin", op, node, self.unary())
        return node

    def unary(self) -> Node:
        tok = self.peek()
        self.nest(tok)
        try:
            if tok.kind == "op" and tok.text in ("-", "+"):
                self.take()
                operand = self.unary()
                return ("neg", operand) if tok.text == "-" else operand
            return self.power()
        finally:
            self.depth -= 1

    def power(self) -> Node:
        base = self.atom()
        if self.peek().kind == "op" and self.peek().text == "^":
            self.take()
            return ("bin", "^", base, self.unary())  # right-associative: a^b^c = a^(b^c)
        return base

    def atom(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            value = float(tok.text)
            if not math.isfinite(value):
                raise FormulaError(f"the number at position {tok.pos} is too large")
            return ("num", value)
        if tok.kind == "name":
            if self.peek().text == "(" and self.peek().kind == "op":
                return self.call(tok)
            if tok.text in FUNCTIONS:
                raise FormulaError(f"function {tok.text!r} at position {tok.pos} needs arguments: {tok.text}(...)")
            return ("var", tok.text)
        if tok.kind == "op" and tok.text == "(":
            node = self.expr()
            self.expect(")")
            return node
        found = repr(tok.text) if tok.kind != "end" else "the end of the formula"
        raise FormulaError(f"expected a number, a name or '(' at position {tok.pos}, found {found}")

    def call(self, name: Token) -> Node:
        if name.text not in FUNCTIONS:
            known = ", ".join(FUNCTIONS)
            raise FormulaError(f"unknown function {name.text!r} at position {name.pos}; known: {known}")
        self.expect("(")
        args = []
        if self.peek().text != ")":
            args.append(self.expr())
            while self.peek().text == "," and self.peek().kind == "op":
                self.take()
                args.append(self.expr())
        self.expect(")")
        _, lo, hi = FUNCTIONS[name.text]
        if len(args) < lo or (hi is not None and len(args) > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}"
            raise FormulaError(f"{name.text}() takes {want} argument(s), got {len(args)}")
        return ("call", name.text, args)


def _variables(node: Node, out: list[str]) -> None:
    kind = node[0]
    if kind == "var" and node[1] not in out:
        out.append(node[1])
    elif kind == "neg":
        _variables(node[1], out)
    elif kind == "bin":
        _variables(node[2], out)
        _variables(node[3], out)
    elif kind == "call":
        for arg in node[2]:
            _variables(arg, out)


def _evaluate(node: Node, env: Mapping[str, float]) -> float:
    """The node's value; FormulaError for any intermediate that is not a finite number."""
    try:
        value = _compute(node, env)
    except (OverflowError, MemoryError):
        raise FormulaError("an intermediate value is too large") from None
    if not math.isfinite(value):
        raise FormulaError(f"an intermediate value is not a finite number ({value})")
    return value


def _depth(tree: Node) -> int:
    """How deep the tree is (counted without recursion: the tree may be deeper than the stack)."""
    deepest, todo = 0, [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        children = [node[1]] if node[0] == "neg" else list(node[2:]) if node[0] == "bin" else \
            node[2] if node[0] == "call" else []
        todo.extend((child, depth + 1) for child in children)
    return deepest


def _fold(node: Node) -> Node:
    """Constant parts computed once, at parse time: a constant that overflows (`9^9^9^9`) is
    refused when the formula is checked, not when the first sample is graded."""
    kind = node[0]
    if kind == "neg":
        node = ("neg", _fold(node[1]))
    elif kind == "bin":
        node = ("bin", node[1], _fold(node[2]), _fold(node[3]))
    elif kind == "call":
        node = ("call", node[1], [_fold(a) for a in node[2]])
    else:
        return node
    parts = [node[1]] if kind == "neg" else node[2:] if kind == "bin" else node[2]
    if all(p[0] == "num" for p in parts):
        return ("num", _evaluate(node, {}))
    return node


def _compute(node: Node, env: Mapping[str, float]) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        if node[1] not in env:
            raise FormulaError(f"unknown variable {node[1]!r}; known: {', '.join(env) or 'none'}")
        return float(env[node[1]])
    if kind == "neg":
        return -_evaluate(node[1], env)
    if kind == "call":
        fn = FUNCTIONS[node[1]][0]
        return float(fn(*[_evaluate(a, env) for a in node[2]]))
    op, a, b = node[1], _evaluate(node[2], env), _evaluate(node[3], env)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            raise FormulaError("division by zero")
        return a / b
    return _pow(a, b)


@dataclass(frozen=True)
class Formula:
    """A parsed `calculate_output` formula."""

    text: str
    tree: Node
    variables: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Formula:
        """Parse `text`; FormulaError says what is wrong and where."""
        if not isinstance(text, str):
            raise FormulaError("the formula must be a string")
        if len(text) > MAX_FORMULA_CHARS:
            raise FormulaError(f"the formula is {len(text):,} characters long (at most {MAX_FORMULA_CHARS:,})")
        tree = _Parser(text).parse()
        if _depth(tree) > MAX_TREE_DEPTH:
            raise FormulaError(f"the formula chains more than {MAX_TREE_DEPTH} operations; split it into sub-graders")
        tree = _fold(tree)
        names: list[str] = []
        _variables(tree, names)
        return cls(text, tree, tuple(names))

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The formula's value for the given variable values; FormulaError if not a finite number."""
        result = _evaluate(self.tree, values)
        if not math.isfinite(result):
            raise FormulaError(f"the formula's value is not a finite number ({result})")
        return result
