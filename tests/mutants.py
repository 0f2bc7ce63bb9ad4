"""Mutants derived mechanically from csrc/kernels, and the run that must kill them.

    python tests/mutants.py --list                 # every generated mutant
    python tests/mutants.py --all --jobs 2         # run them all (make mutants)
    python tests/mutants.py --all --record --limit 100   # the next 100 not yet recorded
    python tests/mutants.py --sample 8 --seed 3    # a random sample
    python tests/mutants.py --key '<key>'          # one mutant, its suite output shown
    python tests/mutants.py --survivors --record   # the recorded survivors again
    python tests/mutants.py --keys-file F --record # the mutants keyed by the lines of F

Operators, applied to the code of every kernel and dispatch source (comments, strings
and preprocessor lines excluded), one change per mutant:
  rel     a relational operator to its off-by-one or negated sibling (< <=, > >=, == !=)
  arith   + -, * /, % / and the compound assignments likewise
  logic   && ||, and a unary ! dropped
  const   an integer literal +1 and -1 (0: +1 only); 0.f / 1.f literals swapped
  swap    the two indices of a[i][j]
  cond    an if's condition replaced by true, and by false
  sync    a __syncthreads(), cluster_sync() or async_commit() removed; a
          cp.async wait allowed one more group in flight
  mask    a full-warp shuffle mask narrowed to half a warp
  call    a whole one-line call statement removed
Not mutated: code the emulator does not compile (device-only blocks), and the
arguments of __launch_bounds__, static_assert and template parameter lists (nvcc-only
or compile-time: the emulator cannot observe them; tests/test_cuda_build.py checks
what nvcc makes of them).

Each mutant is built from the cached emulator objects plus the translation units that
include the mutated file, and run (in a subprocess, with a time limit) through the
mutant suite: tests/emulated_cases.py --quick, the fuzzer's regression cases, and a
fixed fuzz batch (drawn once per run, the same cases for every mutant); it stops at
the first failure. Outcomes: killed (the suite failed),
survived, stillborn (does not compile: not counted), equivalent (listed with the reason
in tests/mutants_equivalent.txt: not counted). The kill rate is killed / (killed +
survived). With --record the outcomes go to tests/mutants_record.txt, from which CI
reruns a random sample of the kills (tests/test_generated_mutants.py).
"""

import argparse
import concurrent.futures
import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import repo_root

repo_root.rerun_with_root(__name__)

import kernel_coverage  # noqa: E402
from tools import cuda_emulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

KERNELS = cuda_emulator.KERNELS
EQUIVALENT = os.path.join(HERE, "mutants_equivalent.txt")
RECORD = os.path.join(HERE, "mutants_record.txt")  # the outcome of each mutant a campaign ran
FUZZ_SEED, FUZZ_CASES = 0, 20  # the fixed fuzz batch of the mutant suite
TIME_LIMIT = 240  # seconds per mutant (the suite takes about 40): a hang the emulator misses is killed


# ---- the code of a source file --------------------------------------------------------------

def code_mask(text: str) -> List[bool]:
    """For each character: True where it is code (not a comment, a string or character
    literal, or a preprocessor line)."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and text[i:].lstrip(" \t").startswith("#"):
            j = text.find("\n", i)
            j = n if j < 0 else j
            while j > 0 and text[j - 1] == "\\" and j < n:  # continued directive
                k = text.find("\n", j + 1)
                j = n if k < 0 else k
            for k in range(i, j):
                mask[k] = False
            i = j
            continue
        line_start = c == "\n"
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                mask[k] = False
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i, min(j + 1, n)):
                mask[k] = False
            i = j + 1
        else:
            i += 1
    return mask


def _matching(text: str, open_at: int) -> int:
    """Index of the parenthesis/bracket closing the one at open_at."""
    pairs = {"(": ")", "[": "]", "<": ">"}
    o, c = text[open_at], pairs[text[open_at]]
    depth = 0
    for k in range(open_at, len(text)):
        if text[k] == o:
            depth += 1
        elif text[k] == c:
            depth -= 1
            if depth == 0:
                return k
    return -1


def excluded_spans(text: str) -> List[Tuple[int, int]]:
    """Spans never mutated: device-only blocks, __launch_bounds__(...), static_assert(...),
    template <...> parameter lists."""
    offsets = [0]
    for line in text.split("\n"):
        offsets.append(offsets[-1] + len(line) + 1)
    spans = [(offsets[first - 1], offsets[last]) for first, last in kernel_coverage.device_only_lines(text)]
    for m in re.finditer(r"\b(__launch_bounds__|static_assert)\s*\(|\btemplate\s*<", text):
        spans.append((m.start(), _matching(text, m.end() - 1) + 1))
    return spans


# ---- mutants -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mutant:
    file: str
    line: int
    start: int         # offset in the file
    end: int
    original: str
    replacement: str
    operator: str
    key: str           # stable across edits elsewhere: file, line text, column, change

    def apply(self, text: str) -> str:
        assert text[self.start:self.end] == self.original, self
        return text[:self.start] + self.replacement + text[self.end:]

    def __str__(self):
        return f"{self.file}:{self.line} {self.operator} {self.original.strip()!r} -> {self.replacement.strip()!r}"


REL = {" < ": [" <= "], " <= ": [" < "], " > ": [" >= "], " >= ": [" > "], " == ": [" != "], " != ": [" == "]}
ARITH = {" + ": [" - "], " - ": [" + "], " * ": [" / "], " / ": [" * "], " % ": [" / "],
         " += ": [" -= "], " -= ": [" += "], " *= ": [" /= "], " /= ": [" *= "]}
LOGIC = {" && ": [" || "], " || ": [" && "]}
KEYWORDS = {"return", "if", "for", "while", "switch", "case", "else", "do", "break", "continue", "using",
            "typedef", "constexpr", "const", "static", "template", "struct", "class", "namespace"}


def _candidates(text: str, mask: List[bool]) -> List[Tuple[int, int, str, str]]:
    """(start, end, replacement, operator) for every mutation of `text`."""
    out = []

    def code(a, b):
        return all(mask[a:b])

    for table, op in ((REL, "rel"), (ARITH, "arith"), (LOGIC, "logic")):
        for token, repls in table.items():
            for m in re.finditer(re.escape(token), text):
                if not code(m.start(), m.end()):
                    continue
                # a - or * starting a unary expression (x = -y, *p) is not binary
                before = text[:m.start()].rstrip()
                if not before or before[-1] in "(=,?:;{[&|!<>+-*/%" and token in (" - ", " * ", " + "):
                    continue
                for r in repls:
                    out.append((m.start(), m.end(), r, op))
    for m in re.finditer(r"!(?=[A-Za-z_(])", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), "", "logic"))
    for m in re.finditer(r"(?<![\w.])(\d+)([uUlL]*)(?![\w.])", text):
        if not code(m.start(), m.end()) or text[m.start() - 2: m.start()] == "0x":
            continue
        value, suffix = int(m.group(1)), m.group(2)
        for v in ([value + 1, value - 1] if value > 0 else [1]):
            out.append((m.start(), m.end(), f"{v}{suffix}", "const"))
    for m in re.finditer(r"(?<![\w.])([01])\.f(?![\w])", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), "1.f" if m.group(1) == "0" else "0.f", "const"))
    for m in re.finditer(r"\[(\w+)\]\[(\w+)\]", text):
        if code(m.start(), m.end()) and m.group(1) != m.group(2):
            out.append((m.start(), m.end(), f"[{m.group(2)}][{m.group(1)}]", "swap"))
    for m in re.finditer(r"\bif \(", text):
        close = _matching(text, m.end() - 1)
        if close > 0 and code(m.start(), close + 1):
            for v in ("true", "false"):
                out.append((m.end(), close, v, "cond"))
    for pattern in (r"__syncthreads\(\);", r"cluster_sync\(\);", r"async_commit\(\);"):
        for m in re.finditer(pattern, text):
            if code(m.start(), m.end()):
                out.append((m.start(), m.end(), "", "sync"))
    for m in re.finditer(r"async_wait<(\d+)>\(\);", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), f"async_wait<{int(m.group(1)) + 1}>();", "sync"))
    for m in re.finditer(r"0xffffffffu", text):
        if code(m.start(), m.end()):
            out.append((m.start(), m.end(), "0x0000ffffu", "mask"))
    for m in re.finditer(r"(?m)^([ \t]*)([A-Za-z_][\w:]*(?:<[^;=\n]*>)?)\((.*)\);[ \t]*$", text):
        word = m.group(2).split("<")[0].split("::")[-1]
        if word in KEYWORDS or not code(m.start(2), m.end()) or "=" in re.sub(r"\(.*\)", "", m.group(3)):
            continue
        before = [c for k, c in enumerate(text[:m.start(2)]) if mask[k] and not c.isspace()]
        if before and before[-1] not in ";{})":
            continue  # a continuation line of a longer statement, not a statement of its own
        out.append((m.start(2), m.end(), "", "call"))
    return out


def generate(files: Optional[List[str]] = None) -> List[Mutant]:
    """Every mutant of the kernel sources (or of `files`), in file order."""
    names = files or sorted(f for f in os.listdir(KERNELS) if f.endswith((".cu", ".cuh", ".h")))
    mutants = []
    for name in names:
        with open(os.path.join(KERNELS, name)) as f:
            text = f.read()
        mask = code_mask(text)
        spans = excluded_spans(text)
        lines = text.split("\n")
        seen_lines: Dict[str, int] = {}
        line_occurrence = []
        for line in lines:
            key = line.strip()
            line_occurrence.append(seen_lines.get(key, 0))
            seen_lines[key] = seen_lines.get(key, 0) + 1
        for start, end, repl, op in sorted(set(_candidates(text, mask))):
            if any(a <= start < b for a, b in spans):
                continue
            line = text.count("\n", 0, start) + 1
            line_start = text.rfind("\n", 0, start) + 1
            stripped = lines[line - 1].strip()
            indent = len(lines[line - 1]) - len(lines[line - 1].lstrip())
            change = " ".join(text[start:end].split()) + "->" + " ".join(repl.split())
            key = f"{name}|{stripped}|{line_occurrence[line - 1]}|{start - line_start - indent}|{change}"
            mutants.append(Mutant(name, line, start, end, text[start:end], repl, op, key))
    return mutants


# ---- mutant schemata: many mutants in one build --------------------------------------------------
# Compiling each mutant separately costs seconds of compile per mutant. Instead, the
# mutants of one file are written into one copy of it, each choosing at run time
# between its change and the original code by comparing ::emu::mutant (set through
# emu_set_mutant) with its number, e.g. `a < b` becomes
# `(::emu::mutant == 7 ? (a <= b) : (a < b))`; one build then runs every mutant in
# turn in one process. Sites nest (a condition inside a call statement inside ...),
# so each rewrite is rendered over the rewritten text inside it. A site the compiler
# refuses in this form (a constant expression: template arguments, array sizes,
# constexpr values) falls back to a build of its own. A build whose mutant 0 (the
# original code) does not pass the suite is not used (then every mutant of it is
# built alone).

M = "::emu::mutant"


@dataclasses.dataclass
class Token:
    text: str
    start: int
    end: int
    before: bool  # whitespace before it
    after: bool   # whitespace after it


_TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|::|->|\+\+|--|&&|\|\||[<>=!+\-*/%&|^]=|\S")
BINARY = {"*": 5, "/": 5, "%": 5, "+": 6, "-": 6, "<<": 7, ">>": 7, "<": 9, "<=": 9, ">": 9, ">=": 9,
          "==": 10, "!=": 10, "&": 11, "^": 12, "|": 13, "&&": 14, "||": 15,
          "=": 16, "+=": 16, "-=": 16, "*=": 16, "/=": 16, "%=": 16, "&=": 16, "|=": 16, "^=": 16}
STOP_WORDS = {"return", "case", "if", "while", "for", "else", "do", "const", "auto", "static", "constexpr"}


def tokenize(text: str, mask: List[bool]) -> List[Token]:
    out = []
    for m in _TOKEN.finditer(text):
        if not mask[m.start()]:
            continue
        out.append(Token(m.group(), m.start(), m.end(), m.start() > 0 and text[m.start() - 1].isspace(),
                         m.end() < len(text) and text[m.end()].isspace()))
    # a spaced << or >> is a shift (the code spaces its binary operators); unspaced, the
    # tokenizer's single < and > stay template brackets
    merged = []
    for t in out:
        if merged and t.text in "<>" and merged[-1].text == t.text and merged[-1].end == t.start \
                and merged[-1].before and t.after:
            merged[-1] = Token(t.text * 2, merged[-1].start, t.end, True, True)
        else:
            merged.append(t)
    return merged


def _binary(t: Token) -> bool:
    return t.text in BINARY and t.before and t.after


def brackets(tokens: List[Token]) -> Dict[int, int]:
    """Matching bracket token indices, both ways: () [] {} and template <> (an
    unspaced < right after a name, closed by an unspaced >)."""
    pairs, stack = {}, []
    for i, t in enumerate(tokens):
        if t.text in "([{":
            stack.append(i)
        elif t.text == "<" and not t.before and i > 0 and re.match(r"\w", tokens[i - 1].text):
            stack.append(i)
        elif t.text in ")]}" or (t.text == ">" and not t.before and stack and tokens[stack[-1]].text == "<"):
            while stack and t.text != ">" and tokens[stack[-1]].text == "<":
                stack.pop()  # a < that was a comparison after all
            if stack:
                j = stack.pop()
                pairs[i], pairs[j] = j, i
    return pairs


def _operand_end(tokens, pairs, i: int, prec: int) -> int:
    """Index after the operand starting at token i of an operator of precedence prec
    (binding everything tighter than prec)."""
    n = len(tokens)
    while i < n and tokens[i].text in ("!", "-", "~", "*", "&", "++", "--", "+") and not tokens[i].after:
        i += 1  # prefix operators
    if i < n and tokens[i].text in ("(", "[", "{") and i in pairs:
        i = pairs[i] + 1
    elif i < n:
        i += 1
    while i < n:  # postfix: calls, subscripts, members, template arguments, braces
        t = tokens[i]
        if t.text in ("(", "[", "{") and not t.before and i in pairs:
            i = pairs[i] + 1
        elif t.text == "<" and i in pairs:
            i = pairs[i] + 1
        elif t.text in (".", "->", "::") or (t.text in ("++", "--") and not t.before):
            i += 1 if t.text in ("++", "--") else 2
        else:
            break
    while i < n and _binary(tokens[i]) and BINARY[tokens[i].text] < prec:
        i = _operand_end(tokens, pairs, i + 1, BINARY[tokens[i].text])
    return i


def _operand_start(tokens, pairs, i: int, prec: int) -> int:
    """Index of the first token of the left operand of the binary operator at token i."""
    j = i - 1
    while j >= 0:
        t = tokens[j]
        if t.text in (")", "]", "}", ">") and j in pairs:
            j = pairs[j] - 1
            continue
        if _binary(t):
            if BINARY[t.text] <= prec:
                j -= 1
                continue
            break
        if t.text in ("(", "[", "{", ",", ";", "?", ":", "}") or t.text in STOP_WORDS:
            break
        if re.match(r"\w", t.text) or t.text in (".", "->", "::") or \
                (t.text in ("!", "-", "~", "*", "&", "++", "--") and not t.after):
            # two names in a row are a declaration (`float x = ...`): stop at the type
            if re.match(r"\w", t.text) and j + 1 < i and re.match(r"\w", tokens[j + 1].text):
                break
            j -= 1
            continue
        break
    return j + 1


@dataclasses.dataclass
class Edit:
    start: int
    end: int
    render: object        # render(R) -> str, R(a, b) renders the original text [a, b)
    mutants: List[Mutant]
    whole: bool = False   # render(R) renders [start, end) whole (R(start, end)), not in pieces
    children: list = dataclasses.field(default_factory=list)


def _array_bounds(text: str, mask: List[bool]) -> List[Tuple[int, int]]:
    """Spans of the [...] of array declarations (`float v[CHUNKS][VEC]`, `float (&v)[N]`):
    their sizes are constants, which a run-time choice cannot be."""
    spans = []
    # `type name[..]`, `(&name)[..]`, and a further declarator `..], name[..]` (this also
    # catches some argument lists `f(a[i], b[j])`: those mutants are merely built alone)
    for m in re.finditer(r"(\b[A-Za-z_]\w*\s*[*&]?\s+[A-Za-z_]\w*|\(&\s*[A-Za-z_]\w*\)|(?<=\])\s*,\s*[A-Za-z_]\w*)"
                         r"\s*(\[[^\]\n]*\])+", text):
        if not mask[m.start()] or m.group(1).split()[0] in ("return", "case", "else", "delete"):
            continue
        spans.append((m.end(1), m.end()))
    return spans


def _edits(text: str, mutants: List[Mutant], ids: Dict[str, int]) -> Tuple[List[Edit], List[Mutant]]:
    """The rewrites of `mutants` (all of one file); mutants whose site cannot be written
    as a rewrite (inside an array declaration's sizes) are returned apart."""
    mask = code_mask(text)
    tokens = tokenize(text, mask)
    pairs = brackets(tokens)
    at = {t.start: k for k, t in enumerate(tokens)}
    bounds = _array_bounds(text, mask)
    edits, alone = [], []
    replace_groups: Dict[Tuple[int, int, str], List[Mutant]] = {}
    for m in mutants:
        k = ids[m.key]
        if any(a <= m.start < b for a, b in bounds):
            alone.append(m)
            continue
        if m.operator in ("rel", "arith", "logic") and m.original.strip() in BINARY:
            op = at.get(m.start + 1)
            if op is None:
                alone.append(m)
                continue
            prec = BINARY[tokens[op].text]
            a = tokens[_operand_start(tokens, pairs, op, prec)].start
            last = _operand_end(tokens, pairs, op + 1, prec if prec != 16 else 17)
            b = tokens[last - 1].end
            o1, o2 = m.start, m.end
            edits.append(Edit(a, b, (lambda R, a=a, b=b, o1=o1, o2=o2, m=m, k=k:
                                     f"({M} == {k} ? ({R(a, o1, True)}{m.replacement}{R(o2, b, True)}) : "
                                     f"({R(a, o1)}{m.original}{R(o2, b)}))"), [m]))
        elif m.operator == "logic":  # a unary ! dropped
            op = at.get(m.start)
            if op is None:
                alone.append(m)
                continue
            b = tokens[_operand_end(tokens, pairs, op + 1, 3) - 1].end
            edits.append(Edit(m.start, b, (lambda R, a=m.start, b=b, k=k:
                                           f"({M} == {k} ? static_cast<bool>({R(a + 1, b, True)}) : "
                                           f"!{R(a + 1, b)})"), [m]))
        elif m.operator == "swap":
            inner = re.match(r"\[(\w+)\]\[(\w+)\]", m.original)
            i1, i2 = m.start + 1, m.start + 1 + len(inner.group(1))
            j1 = i2 + 2
            j2 = j1 + len(inner.group(2))
            edits.append(Edit(m.start, m.end, (lambda R, i1=i1, i2=i2, j1=j1, j2=j2, k=k:
                                               f"[({M} == {k} ? {R(j1, j2, True)} : {R(i1, i2)})]"
                                               f"[({M} == {k} ? {R(i1, i2, True)} : {R(j1, j2)})]"), [m]))
        elif m.operator == "sync" and m.replacement == "":
            edits.append(Edit(m.start, m.end, (lambda R, a=m.start, b=m.end, k=k:
                                               f"{{ if ({M} != {k}) {R(a, b)} }}"), [m]))
        elif m.operator == "sync":  # a wait allowing one more group in flight
            edits.append(Edit(m.start, m.end, (lambda R, a=m.start, b=m.end, k=k, r=m.replacement:
                                               f"{{ if ({M} == {k}) {r} else {R(a, b)} }}"), [m]))
        elif m.operator == "call":
            edits.append(Edit(m.start, m.end, (lambda R, a=m.start, b=m.end, k=k:
                                               f"{{ if ({M} != {k}) {R(a, b)} }}"), [m]))
        else:  # const, mask, cond: the span replaced by one of several values
            replace_groups.setdefault((m.start, m.end, m.operator), []).append(m)
    for (a, b, op), group in replace_groups.items():
        def render(R, a=a, b=b, op=op, group=group):
            choices = "".join(f"{M} == {ids[m.key]} ? {m.replacement} : " for m in group)
            orig = f"static_cast<bool>({R(a, b)})" if op == "cond" else R(a, b)
            return f"({choices}{orig})"
        edits.append(Edit(a, b, render, group, whole=True))
    return edits, alone


def _nest(edits: List[Edit]) -> Tuple[List[Edit], List[Edit]]:
    """(top-level edits with their children nested, edits that partially overlap another)."""
    # Of edits with the same span, one rendering the whole span (a condition replaced)
    # goes outside one that renders its operands apart (the comparison that is that
    # condition): the outer renders its inner, not the other way round.
    edits = sorted(edits, key=lambda e: (e.start, -e.end, not e.whole))
    for e in edits:
        e.children = []
    roots, stack, clashes = [], [], []
    for e in edits:
        while stack and stack[-1].end <= e.start:
            stack.pop()
        if stack and e.end > stack[-1].end:
            clashes.append(e)
            continue
        (stack[-1].children if stack else roots).append(e)
        stack.append(e)
    return roots, clashes


def render_schema(text: str, edits: List[Edit], markers: bool = False) -> str:
    """`text` with every edit rendered over its rewritten inside. A rewrite that repeats
    a piece of code (both branches of a choice) writes the copy on one line, without
    comments, so the result has the original's lines: a compile error's line is the
    original line. ``markers``: each edit's output is bracketed by comments naming it
    (/*<n*/ ... /*>n*/, n its index in `edits`), so an error's column names the edit."""
    roots, clashes = _nest(edits)
    assert not clashes
    index = {id(e): n for n, e in enumerate(edits)}
    mask = code_mask(text)

    def original(a: int, b: int, flat: bool) -> str:
        if not flat:
            return text[a:b]
        return "".join(" " if c == "\n" or not mask[a + k] else c for k, c in enumerate(text[a:b]))

    def render_range(a: int, b: int, nodes: List[Edit], flat: bool = False) -> str:
        out, pos = [], a
        for e in nodes:
            if e.start < a or e.end > b:
                continue
            out.append(original(pos, e.start, flat))
            body = e.render(lambda x, y, copy=False, e=e: render_range(x, y, e.children, flat or copy))
            n = index[id(e)]
            out.append(f"/*<{n}*/{body}/*>{n}*/" if markers and not flat else body)
            pos = e.end
        out.append(original(pos, b, flat))
        return "".join(out)

    return render_range(0, len(text), roots)


def _enclosing_block(text: str, a: int, b: int) -> Tuple[int, int]:
    """The span [a, b) of one line widened to the innermost { } block that the line
    closes, or else contains (the body of a constexpr function whose error the compiler
    reports at its closing brace, for one)."""
    mask = code_mask(text)
    opens, blocks = [], []
    for k, c in enumerate(text):
        if not mask[k]:
            continue
        if c == "{":
            opens.append(k)
        elif c == "}" and opens:
            blocks.append((opens.pop(), k + 1))
    closing = [blk for blk in blocks if a <= blk[1] - 1 < b]
    containing = [blk for blk in blocks if blk[0] <= a and b <= blk[1]]
    block = (max(closing, key=lambda blk: blk[0]) if closing else  # the innermost closing on this line
             max(containing, key=lambda blk: blk[0]) if containing else (a, b))
    # a namespace or a whole kernel is too wide a guess: then the line alone
    return block if text.count("\n", block[0], block[1]) <= 40 else (a, b)


def _edits_at(schema_text: str, offsets: List[int]) -> set:
    """Indices of the innermost marked edits containing each offset of the schema text."""
    spans, stack = [], []
    for m in re.finditer(r"/\*([<>])(\d+)\*/", schema_text):
        if m.group(1) == "<":
            stack.append((int(m.group(2)), m.start()))
        else:
            n, start = stack.pop()
            spans.append((start, m.end(), n))
    found = set()
    for o in offsets:
        inside = [(start, n) for start, end, n in spans if start <= o < end]
        if inside:
            found.add(max(inside)[1])
    return found


@dataclasses.dataclass
class Outcome:
    status: str   # killed, survived, stillborn, timeout
    detail: str
    seconds: float


def baseline_objects() -> Dict[str, str]:
    """The checked emulator's objects for today's sources (built once, cached)."""
    lib = cuda_emulator.build_cached()
    d = os.path.dirname(lib)
    return {s: os.path.join(d, s + ".o") for s in cuda_emulator.KERNEL_SOURCES + cuda_emulator.RUNTIME_SOURCES}


def build_mutant(file: str, new_text: str, baseline: Dict[str, str], work: str) -> str:
    """The emulator library with `file` of csrc/kernels replaced by `new_text`: the
    translation units that include it recompiled, the rest taken from `baseline`.
    Raises cuda_emulator.BuildError if it does not compile."""
    kernels = os.path.join(work, "kernels")
    shutil.copytree(KERNELS, kernels)
    path = os.path.join(kernels, file)
    with open(path, "w") as f:
        f.write(new_text)
    # Every translation unit that includes the file, the emulator's own (api.cpp reads
    # the params structs) as well as the kernels': one left as it was would be linked
    # with another idea of a struct or a constant.
    sources = ([os.path.join(kernels, s) for s in cuda_emulator.KERNEL_SOURCES] +
               [os.path.join(cuda_emulator.EMULATOR, s) for s in cuda_emulator.RUNTIME_SOURCES])
    affected = [os.path.basename(s) for s in sources
                if path in cuda_emulator.includes(s, [kernels, cuda_emulator.EMULATOR])]
    objects = dict(baseline)
    objects.update(cuda_emulator.compile_objects(os.path.join(work, "obj"), kernels, only=affected, jobs=1,
                                                 debug=False))
    return cuda_emulator.link(objects, os.path.join(work, "mutant.so"))


@dataclasses.dataclass
class Schema:
    lib: str
    ids: Dict[str, int]  # mutant key -> its number in this build


def build_schema(file: str, mutants: List[Mutant], baseline: Dict[str, str], work: str,
                 out=sys.stdout) -> Tuple[Optional[Schema], List[Mutant]]:
    """One build holding `mutants` (all of `file`); returns it (None if nothing could be
    built) and the mutants that need a build of their own."""
    with open(os.path.join(KERNELS, file)) as f:
        text = f.read()
    ids = {m.key: k + 1 for k, m in enumerate(mutants)}
    edits, alone = _edits(text, mutants, ids)
    _, clashes = _nest(edits)
    edits = [e for e in edits if e not in clashes]
    alone += [m for e in clashes for m in e.mutants]
    orig_starts = [0]
    for line in text.split("\n"):
        orig_starts.append(orig_starts[-1] + len(line) + 1)
    for attempt in range(12):
        if not edits:
            return None, alone
        new_text = render_schema(text, edits, markers=True)
        edits, lost = _rendered(new_text, edits, ids)
        if lost:  # built alone; the schema is rendered again without them
            alone += [m for e in lost for m in e.mutants]
            continue
        shutil.rmtree(work, ignore_errors=True)
        try:
            lib = build_mutant(file, new_text, baseline, work)
        except cuda_emulator.BuildError as err:
            # the edits an error points into (innermost); else every edit on a line it names
            starts = [0]
            for line in new_text.split("\n"):
                starts.append(starts[-1] + len(line) + 1)
            errors = [(int(ln), int(col)) for ln, col in
                      re.findall(re.escape(file) + r":(\d+):(\d+): error", err.stderr)]
            found = set()
            lines = set()
            for ln, col in errors:
                hit = _edits_at(new_text, [starts[ln - 1] + col - 1])
                found |= hit
                if not hit:
                    lines.add(ln)  # the error is not inside a rewrite: every rewrite on its line
            if not errors:  # only notes name this file (the error is in a file it includes)
                lines = {int(n) for n in re.findall(re.escape(file) + r":(\d+):", err.stderr)}
            spans = []  # character spans of the original refused: the lines named (widened to
            for ln in lines:  # their block when no rewrite is on the line itself)
                a = orig_starts[ln - 1]
                b = orig_starts[ln] if ln < len(orig_starts) else len(text)
                on_line = any(e.start < b and e.end > a for e in edits)
                spans.append((a, b) if on_line else _enclosing_block(text, a, b))
            refused = [e for n, e in enumerate(edits)
                       if n in found or any(a <= e.start and e.end <= b or (e.start < b and e.end > a)
                                            for a, b in spans)]
            if not refused:
                print(f"schema of {file}: the build fails outside the rewritten sites:\n{err.stderr[-1500:]}",
                      file=out)
                return None, alone + [m for e in edits for m in e.mutants]
            edits = [e for e in edits if e not in refused]
            alone += [m for e in refused for m in e.mutants]
            continue
        kept = {m.key for e in edits for m in e.mutants}
        return Schema(lib, {k: v for k, v in ids.items() if k in kept}), alone
    return None, alone + [m for e in edits for m in e.mutants]


def _rendered(schema_text: str, edits: List[Edit], ids: Dict[str, int]) -> Tuple[List[Edit], List[Edit]]:
    """(edits whose mutants all appear in the rendered schema, edits with one that does
    not): a rewrite nested where its parent never renders it would otherwise run the
    original code under its mutant's number and be counted a survivor."""
    present = set(int(n) for n in re.findall(re.escape(M) + r" [=!]= (\d+)\b", schema_text))
    ok, lost = [], []
    for e in edits:
        (ok if all(ids[m.key] in present for m in e.mutants) else lost).append(e)
    return ok, lost


# ---- running mutants in one process ----------------------------------------------------------------

def _worker(lib: str, fuzz_cases: str) -> None:
    """Reads mutant numbers from stdin; for each, runs the mutant suite in this process on
    `lib` with that mutant switched on, and writes `RESULT <number> <status> <detail>`."""
    import emulated_cases
    import fuzz_emulated
    import fuzz_space
    from fuzz_space import Case

    emu = cuda_emulator.Emulator(lib, fuzz_space.kernel_build())
    regressions = fuzz_emulated.regressions()
    with open(fuzz_cases) as f:
        fixed = [Case.from_json(line) for line in f if line.strip()]
    for line in sys.stdin:
        k = int(line)  # -1: the original code, through the quick part of the suite only
        emu.lib.emu_set_mutant(max(k, 0))
        status, detail = "survived", ""
        try:
            emulated_cases.run_all(emu, quick=True)
            for why, case in (regressions if k >= 0 else []):
                fuzz_emulated.check(emu, case, f"regression ({why}): ")
            for n, case in enumerate(fixed if k >= 0 else []):
                fuzz_emulated.check(emu, case, f"fixed fuzz case {n}: ")
        except AssertionError as err:
            status, detail = "killed", " ".join(str(err).split())[:400]
        finally:
            emu.lib.emu_set_mutant(0)
            emu.clear_injections()
            emu.lib.emu_take_last_error()
            emu.flush_start = False
            emu.schedule("round_robin")
            emu.configure()
        sys.stdout.write(f"RESULT {k} {status} {detail}\n")
        sys.stdout.flush()


class Worker:
    """A process running mutants of one build, one at a time, with a time limit each."""

    def __init__(self, lib: str, fuzz_cases: str):
        self.lib, self.fuzz_cases = lib, fuzz_cases
        self.proc = None
        self.pending = b""

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", self.lib,
                                      self.fuzz_cases], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=0, env=repo_root.env())
        self.pending = b""

    def run(self, k: int, time_limit: float = TIME_LIMIT) -> Tuple[str, str]:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{k}\n".encode())
        deadline = time.monotonic() + time_limit
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith("RESULT "):
                    _, num, status, *detail = text.split(" ", 3)
                    assert int(num) == k, (num, k)
                    return status, detail[0] if detail else ""
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                self.close()
                return "timeout", f"ran past {time_limit:.0f} s (a hang the emulator did not report)"
            chunk = os.read(fd, 65536)
            if not chunk:  # the process died: a crash the emulator did not turn into a report
                code = self.proc.wait()
                self.proc = None
                return "killed", f"the suite's process died (exit {code})"
            self.pending += chunk

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def fixed_fuzz_batch(path: str) -> str:
    """Writes the mutant suite's fuzz batch (FUZZ_CASES cases of seed FUZZ_SEED, drawn
    once with today's plans, so every mutant runs the very same cases) to `path`."""
    import fuzz_space

    emu = cuda_emulator.Emulator(cuda_emulator.build_cached(), fuzz_space.kernel_build())
    rng = random.Random(FUZZ_SEED)
    boundaries = fuzz_space.plan_boundaries(emu.path)
    with open(path, "w") as f:
        for _ in range(FUZZ_CASES):
            f.write(fuzz_space.generate(rng, emu, boundaries).to_json() + "\n")
    return path


def _entries(path: str) -> List[str]:
    """The lines of `path` that are neither blank nor comments (none if it is missing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]


def equivalents() -> Dict[str, str]:
    """tests/mutants_equivalent.txt: key -> why (entries are `key  -- why`)."""
    pairs = (line.partition("  -- ") for line in _entries(EQUIVALENT))
    return {key.strip(): why.strip() for key, _, why in pairs}


def record() -> Dict[str, str]:
    """tests/mutants_record.txt: key -> outcome (killed, timeout, survived, stillborn) of
    every mutant a campaign (``--all --record``) has run; entries are `outcome key`."""
    pairs = (line.partition(" ") for line in _entries(RECORD))
    return {key: status for status, _, key in pairs}


def write_record(results: Dict[str, "Outcome"], mutants: List["Mutant"]) -> None:
    """Merges `results` into tests/mutants_record.txt (entries of mutants the sources no
    longer give are dropped), in the generator's order."""
    known = record()
    known.update({k: r.status for k, r in results.items()})
    with open(RECORD, "w") as f:
        f.write("# Outcome of every generated mutant a campaign has run (python tests/mutants.py --all\n"
                "# --record): `outcome key`. tests/test_generated_mutants.py reruns a random sample of\n"
                "# the killed ones in CI; survivors are listed, with why, in tests/mutants_equivalent.txt.\n")
        for m in mutants:
            if m.key in known:
                f.write(f"{known[m.key]} {m.key}\n")


CHUNK = 24  # mutants of one build a process runs before the next task
SCHEMA_MIN = 3  # a file with no more mutants than this builds each alone


def run_all(mutants: List[Mutant], jobs: int = 2, out=sys.stdout, full_sanity: bool = True) -> Dict[str, Outcome]:
    """Every mutant through the mutant suite: per file one schema build (and a build of
    its own for each site the schema cannot hold), `jobs` tasks at a time (a build, or
    a chunk of a build's mutants run in one process). A build's own first run is its
    mutant 0, the original code, through the whole suite (``full_sanity``; else the
    quick part): if that fails, the rewrite changed the program and each of its
    mutants is built alone instead."""
    import queue
    import threading

    baseline = baseline_objects()
    work = tempfile.mkdtemp(prefix="mutants-")
    results: Dict[str, Outcome] = {}
    by_key = {m.key: m for m in mutants}
    lock = threading.Lock()
    tasks: "queue.Queue" = queue.Queue()
    pending = [0]  # tasks queued or running
    builds: Dict[str, dict] = {}  # file -> {"wrong": reason or None, "outcomes": [...], "chunks": n}

    def note(m: Mutant, r: Outcome):
        with lock:
            results[m.key] = r
            print(f"{r.status:9s} {r.seconds:5.1f}s  {m}   [{m.key}]" +
                  (f"\n          {r.detail[:300]}" if r.detail else ""),
                  file=out, flush=True)

    def put(task):
        with lock:
            pending[0] += 1
        tasks.put(task)

    def alone(m: Mutant, n: int):
        t = time.monotonic()
        d = os.path.join(work, f"a{n}")
        with open(os.path.join(KERNELS, m.file)) as f:
            text = f.read()
        try:
            lib = build_mutant(m.file, m.apply(text), baseline, d)
        except cuda_emulator.BuildError as err:
            note(m, Outcome("stillborn", str(err).splitlines()[-1][:200], time.monotonic() - t))
            shutil.rmtree(d, ignore_errors=True)
            return
        worker = Worker(lib, fuzz_cases)
        try:
            status, detail = worker.run(0)
        finally:
            worker.close()
        note(m, Outcome(status, detail, time.monotonic() - t))
        shutil.rmtree(d, ignore_errors=True)

    def build(file: str, group: List[Mutant], n: int):
        if len(group) <= SCHEMA_MIN:  # a few mutants: a build each beats a schema's retries
            for k, m in enumerate(group):
                put(("alone", m, f"{n}-{k}"))
            return
        schema, left = build_schema(file, group, baseline, os.path.join(work, f"s{n}"), out)
        for k, m in enumerate(left):
            put(("alone", m, f"{n}-{k}"))
        if schema is None:
            return
        numbered = [(by_key[key], k) for key, k in sorted(schema.ids.items(), key=lambda kv: kv[1])]
        chunks = [numbered[i:i + CHUNK] for i in range(0, len(numbered), CHUNK)]
        with lock:
            builds[file] = {"wrong": None, "outcomes": [], "chunks": len(chunks), "numbered": numbered}
        for i, chunk in enumerate(chunks):
            put(("chunk", file, schema.lib, chunk, i == 0))

    def chunk(file: str, lib: str, numbered, sanity: bool):
        worker = Worker(lib, fuzz_cases)
        outcomes = []
        try:
            if sanity:
                status, detail = worker.run(0 if full_sanity else -1)
                if status != "survived":
                    with lock:
                        builds[file]["wrong"] = detail or status
            for m, k in numbered:
                t = time.monotonic()
                status, detail = worker.run(k)
                outcomes.append((m, Outcome(status, detail, time.monotonic() - t)))
        finally:
            worker.close()
        with lock:
            b = builds[file]
            b["outcomes"] += outcomes
            b["chunks"] -= 1
            finished = b["chunks"] == 0
        if finished:  # every chunk of the build ran: keep its outcomes, or redo them alone
            if b["wrong"] is not None:
                print(f"the rewritten {file} fails the suite with no mutant on ({b['wrong']}): its mutants "
                      f"are built alone", file=out, flush=True)
                for k, (m, _) in enumerate(b["numbered"]):
                    put(("alone", m, f"redo-{file}-{k}"))
            else:
                for m, r in b["outcomes"]:
                    note(m, r)

    def loop():
        while True:
            task = tasks.get()
            if task is None:
                return
            try:
                kind, *args = task
                {"alone": alone, "build": build, "chunk": chunk}[kind](*args)
            except Exception as err:  # a harness error: report it and go on
                print(f"task {task[0]} failed: {err!r}", file=out, flush=True)
            finally:
                with lock:
                    pending[0] -= 1
                    if pending[0] == 0:
                        for _ in range(jobs):
                            tasks.put(None)

    try:
        fuzz_cases = fixed_fuzz_batch(os.path.join(work, "fuzz-cases.jsonl"))
        files: Dict[str, List[Mutant]] = {}
        for m in mutants:
            files.setdefault(m.file, []).append(m)
        # the largest files first: their builds and chunks set the length of the run
        for n, (file, group) in enumerate(sorted(files.items(), key=lambda kv: -len(kv[1]))):
            put(("build", file, group, n))
        threads = [threading.Thread(target=loop) for _ in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def summary(mutants: List[Mutant], results: Dict[str, Outcome]) -> Tuple[str, List[Mutant]]:
    """The kill rate, and the survivors not listed as equivalent."""
    eq = equivalents()
    counts = {"killed": 0, "survived": 0, "stillborn": 0, "timeout": 0, "equivalent": 0}
    unexplained = []
    for m in mutants:
        r = results.get(m.key)
        if r is None:
            continue
        if r.status == "survived" and m.key in eq:
            counts["equivalent"] += 1
        else:
            counts[r.status] += 1
            if r.status == "survived":
                unexplained.append(m)
    killed = counts["killed"] + counts["timeout"]
    live = killed + counts["survived"]
    rate = 100.0 * killed / live if live else 100.0
    text = (f"{len(results)} mutants: {counts['killed']} killed, {counts['timeout']} timed out (killed), "
            f"{counts['survived']} survived, {counts['equivalent']} equivalent, {counts['stillborn']} stillborn; "
            f"kill rate {rate:.1f}% of the non-equivalent")
    return text, unexplained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--all", action="store_true")
    p.add_argument("--sample", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--key", help="run one mutant, by key")
    p.add_argument("--keys-file", help="run the mutants whose keys are the lines of this file")
    p.add_argument("--files", nargs="*", help="only these kernel sources")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--record", action="store_true",
                   help=f"merge the outcomes into {os.path.relpath(RECORD)}; with --all, skip recorded mutants")
    p.add_argument("--limit", type=int, help="with --all: at most this many (a random sample, in rounds)")
    p.add_argument("--survivors", action="store_true",
                   help=f"run again the mutants {os.path.relpath(RECORD)} records as survivors")
    p.add_argument("--worker", nargs=2, metavar=("LIB", "FUZZ_CASES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    mutants = generate(args.files)
    if args.list:
        for m in mutants:
            print(f"{m}   [{m.key}]")
        counts: Dict[str, int] = {}
        for m in mutants:
            counts[m.operator] = counts.get(m.operator, 0) + 1
        print(f"{len(mutants)} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0
    if args.key:
        chosen = [m for m in mutants if m.key == args.key]
        if not chosen:
            print(f"no mutant has key {args.key!r}")
            return 2
    elif args.sample:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        print(f"sample of {args.sample} with seed {seed}")
        chosen = random.Random(seed).sample(mutants, min(args.sample, len(mutants)))
    elif args.keys_file:
        with open(args.keys_file) as f:
            wanted = {line.rstrip("\n") for line in f if line.strip()}
        chosen = [m for m in mutants if m.key in wanted]
    elif args.survivors:
        done = record()
        chosen = [m for m in mutants if done.get(m.key) == "survived"]
    elif args.all:  # in a fixed random order: a run cut short is still a fair sample
        chosen = random.Random(0).sample(mutants, len(mutants))
        if args.record:
            done = record()
            chosen = [m for m in chosen if m.key not in done]
        if args.limit:
            chosen = chosen[:args.limit]
    else:
        p.error("one of --list, --all, --sample, --key, --survivors")
    results = run_all(chosen, args.jobs)
    if args.record:
        write_record(results, mutants)
    text, unexplained = summary(chosen, results)
    print(text)
    for m in unexplained:
        print(f"SURVIVED (not listed in {os.path.relpath(EQUIVALENT)}): {m}\n  key: {m.key}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
