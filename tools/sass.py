"""Reading the kernels' SASS: what nvcc's output says about bytes in flight.

A memory-bound kernel reaches the HBM floor only with enough independent bytes in
flight per SM (Little's law). That is visible in the compiled code (``cuobjdump
-sass`` of the compile in tools/cubin.py), without a GPU:

- local memory (LDL/STL) and the width of every global load and store (LDG/STG
  .128, .64, 32-bit, 16-bit...);
- **dependent global-memory round trips per row iteration**: Volta and later encode
  in each instruction which scoreboard a variable-latency result will signal (write
  barrier) and which scoreboards it waits on (wait mask). Along every path through
  the row loop's body (inner loops taken once), a round trip is counted each time
  an instruction waits on a scoreboard holding a global load issued since the last
  counted wait; loads issued before that wait were in flight during it and cost
  nothing more. The fewest and most over all paths are reported (the dtype of each
  tensor picks one branch of each runtime switch: the parameter values of one call
  are propagated as constants through the control flow graph).

bench/sass_audit.py adds the launch plans and the performance model to make the
audit table of bench/NOTES.md; bench/model_facts.py reads the same facts for the
model; tests/test_sass_audit.py holds the thresholds every hot kernel must keep.
"""

import dataclasses
import os
import re
from collections import Counter
from typing import Dict, List, Optional, Tuple

from . import cubin

# ---- SASS ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Control:
    """The scheduling bits of a Volta+ instruction (bits 105-125 of its 128)."""

    stall: int
    yield_: int
    write_barrier: int  # scoreboard this instruction's result signals (7: none)
    read_barrier: int   # scoreboard released when its sources are read (7: none)
    wait_mask: int      # scoreboards to wait on before issuing (6 bits)
    reuse: int


def decode_control(high: int) -> Control:
    c = high >> 41
    return Control(c & 0xF, (c >> 4) & 1, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 0x3F, (c >> 17) & 0xF)


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str      # "@P0", "@!P1" or ""
    op: str        # "LDG.E.128.CONSTANT"
    operands: str
    ctrl: Control

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def branch_target(self) -> Optional[int]:
        if self.base not in ("BRA", "JMP"):
            return None
        m = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(m.group(1), 16) if m else None

    def is_global_load(self) -> bool:
        return self.base in ("LDG", "LDGSTS") or (self.base == "LD" and ".E" in self.op)

    def is_global_store(self) -> bool:
        return self.base in ("STG", "RED", "ATOMG") or (self.base == "ST" and ".E" in self.op)

    def width(self) -> int:
        """Bits moved per thread by a global access."""
        for w in (128, 64):
            if f".{w}" in self.op:
                return w
        if re.search(r"\.(U|S)16\b", self.op):
            return 16
        if re.search(r"\.(U|S)8\b", self.op):
            return 8
        return 32


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)\s*(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
_HIGH = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """{mangled function: instructions} from ``cuobjdump -sass`` of one architecture."""
    functions: Dict[str, List[Instr]] = {}
    current: Optional[List[Instr]] = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and current is not None and i + 1 < len(lines):
            h = _HIGH.match(lines[i + 1])
            if not h:
                continue
            current.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                                 m.group(4), decode_control(int(h.group(1), 16))))
    return functions


# ---- control flow and round trips ----------------------------------------------------------


def blocks(instrs: List[Instr]) -> Tuple[List[List[Instr]], Dict[int, List[int]]]:
    """Basic blocks (lists of instructions) and successor block indices."""
    if not instrs:
        return [], {}
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        t = ins.branch_target()
        if t is not None and t in index:
            leaders.add(index[t])
        if ins.base in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX") and k + 1 < len(instrs):
            leaders.add(k + 1)
    starts = sorted(leaders)
    bl = [instrs[s:e] for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {b[0].addr: n for n, b in enumerate(bl)}
    succ: Dict[int, List[int]] = {}
    for n, b in enumerate(bl):
        last, out = b[-1], []
        t = last.branch_target()
        if t is not None and t in block_of:
            out.append(block_of[t])
        unconditional_end = last.pred == "" and last.base in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX")
        if not unconditional_end and n + 1 < len(bl):
            out.append(n + 1)
        succ[n] = out
    return bl, succ


def loops(bl, succ) -> List[Tuple[int, int]]:
    """(header block, latch block) of every back edge, outermost (widest) first."""
    return sorted({(t, n) for n, outs in succ.items() for t in outs if t <= n},
                  key=lambda hl: (hl[1] - hl[0]), reverse=True)


# ---- which branches a call takes: constants from the kernel parameters ---------------------
# The kernels switch on each tensor's dtype tag at run time (and on is_rms_norm /
# memory_efficient). Those bytes come from the parameter struct (LDC.U8 c[0x0][off]),
# are widened (PRMT), copied (MOV) and compared (ISETP ... imm). Propagating them as
# constants through the CFG, with the values of one call (e.g. everything bf16),
# decides those branches; every other branch stays open.

PARAM_BASE = {"80": 0x160, "90": 0x210}  # where the kernel parameters start in bank 0
_PRED_DEFS = ("ISETP", "UISETP", "FSETP", "DSETP", "HSETP2", "PSETP", "PLOP3", "UPLOP3", "VOTE",
              "VOTEU", "R2P", "FCHK")
_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "JMP", "EXIT", "RET", "BAR", "BSSY", "BSYNC",
            "NOP", "WARPSYNC", "CALL", "MEMBAR", "DEPBAR", "ERRBAR", "CCTL", "YIELD", "BPT")
_CMP = {"EQ": lambda a, b: a == b, "NE": lambda a, b: a != b, "LT": lambda a, b: a < b,
        "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b}


def _tokens(operands: str) -> List[str]:
    return [t.strip() for t in operands.split(",")] if operands else []


def _reg(tok: str) -> str:
    return tok.strip().lstrip("-|!").split(".")[0]


def _value(tok: str, state: dict):
    t = tok.strip()
    neg = t.startswith("!")
    if re.fullmatch(r"0x[0-9a-f]+", t):
        return int(t, 16)
    t = _reg(t)
    if t in ("RZ", "URZ"):
        return 0
    if t in ("PT", "UPT"):
        return not neg
    v = state.get(t)
    if v is None:
        return None
    return (not v) if neg else v


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """LOP3's bitwise function `lut` (a is 0xF0, b 0xCC, c 0xAA) of three 32-bit words."""
    mask = 0xFFFFFFFF
    r = 0
    for k in range(8):
        if lut >> k & 1:
            r |= ((a if k & 4 else ~a) & (b if k & 2 else ~b) & (c if k & 1 else ~c)) & mask
    return r


def transfer(ins: Instr, state: dict, fields: Dict[int, int], base: int) -> dict:
    """The known register and predicate values after `ins`."""
    guard = True
    if ins.pred:
        guard = _value(ins.pred[1:], state)
        if guard is False:
            return state
    ops = _tokens(ins.operands)
    b = ins.base
    if b in _NO_DEST or not ops:
        return state
    out = dict(state)
    if b in _PRED_DEFS:
        dests = [_reg(t) for t in ops[:2] if re.fullmatch(r"!?U?P[0-6T]", t)]
    else:
        # A predicate before the register destination (SHFL's PT, R3, ...) and a carry-out
        # predicate after it (IADD3 R14, P3, ...) are written too.
        first = 1 if re.fullmatch(r"!?U?P[0-6T]", ops[0]) and len(ops) > 1 else 0
        dests = [_reg(t) for t in ops[:first + 2] if re.fullmatch(r"!?U?P[0-6T]", t)]
        dests.insert(0, _reg(ops[first]))
        m = re.fullmatch(r"(U?R)(\d+)", dests[0])
        wide = re.search(r"\.(64|128)\b", ins.op)
        pair = ".WIDE" in ins.op or "F64" in ins.op or b in ("DADD", "DMUL", "DFMA", "DMNMX", "CS2R")
        if m and (wide or pair):  # wide results use the next registers: one more for 64 bits, three for 128
            count = 3 if wide and wide.group(1) == "128" else 1
            dests += [f"{m.group(1)}{int(m.group(2)) + k}" for k in range(1, count + 1)]
    for d in dests:
        out.pop(d, None)
    if guard is not True:
        return out  # a predicated write that may not happen: unknown
    known = None
    if b in ("LDC", "ULDC") and re.search(r"\.([US]8|64)\b", ins.op):
        m = re.search(r"c\[0x0\]\[0x([0-9a-f]+)\]", ins.operands)
        f = fields.get(int(m.group(1), 16) - base) if m else None
        if ".64" in ins.op:  # a pointer field: its two words
            if isinstance(f, tuple) and len(dests) >= 2:
                out[dests[0]], out[dests[1]] = f
            return out
        known = f if isinstance(f, int) else None
    elif b in ("MOV", "UMOV") and len(ops) >= 2:
        known = _value(ops[1], state)
    elif ins.op.startswith("IMAD.MOV") and len(ops) >= 4:
        known = _value(ops[3], state)
    elif b == "PRMT" and len(ops) >= 3 and ops[2] in ("0x9910", "0x8880", "0x7710", "0x7610"):
        v = _value(ops[1], state)
        known = v if isinstance(v, int) and 0 <= v < 128 else None  # widening a small byte
    elif b in ("ISETP", "UISETP") and len(ops) >= 6 and ".EX" in ins.op and _value(ops[4], state) is True:
        # The high words of a 64-bit (in)equality, the low words' result in ops[5].
        cmp = next((c for c in ("EQ", "NE") if f".{c}." in ins.op + "."), None)
        x, y, low = _value(ops[2], state), _value(ops[3], state), _value(ops[5], state)
        if cmp and isinstance(x, int) and isinstance(y, int) and isinstance(low, bool) \
                and not isinstance(x, bool) and not isinstance(y, bool):
            r = (x == y and low) if cmp == "EQ" else (x != y or low)
            if _reg(ops[0]) not in ("PT", "UPT"):
                out[_reg(ops[0])] = r
            if _reg(ops[1]) not in ("PT", "UPT"):
                out[_reg(ops[1])] = not r
        return out
    elif b in ("ISETP", "UISETP") and len(ops) >= 5 and ".EX" not in ins.op:
        # Pd = cmp (op) Pc, Pe = !cmp (op) Pc, op the .AND / .OR after the comparison.
        cmp = next((c for c in _CMP if f".{c}." in ins.op + "."), None)
        x, y, pc = _value(ops[2], state), _value(ops[3], state), _value(ops[4], state)
        comb = {".AND": lambda r, q: r and q, ".OR": lambda r, q: r or q}
        how = next((k for k in comb if k + "." in ins.op + "." or ins.op.endswith(k)), None)
        if (cmp and how and isinstance(pc, bool) and isinstance(x, int) and isinstance(y, int)
                and not isinstance(x, bool) and not isinstance(y, bool)):
            r = _CMP[cmp](x, y)
            if _reg(ops[0]) not in ("PT", "UPT"):
                out[_reg(ops[0])] = comb[how](r, pc)
            if _reg(ops[1]) not in ("PT", "UPT"):
                out[_reg(ops[1])] = comb[how](not r, pc)
        return out
    elif b in ("LOP3", "ULOP3") and ".LUT" in ins.op:
        # LOP3.LUT [Pd,] Rd, a, b, c, lut, Pp: the bitwise function `lut` of a, b, c (Pd:
        # the result is nonzero); only with Pp false, as the compiler writes it.
        first = 1 if re.fullmatch(r"!?U?P[0-6T]", ops[0]) else 0
        if len(ops) >= first + 6 and _value(ops[first + 5], state) is False:
            a, bb, c = (_value(t, state) for t in ops[first + 1:first + 4])
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (a, bb, c)):
                r = _lop3(a, bb, c, int(ops[first + 4], 16))
                if _reg(ops[first]) not in ("RZ", "URZ"):
                    out[_reg(ops[first])] = r
                if first and _reg(ops[0]) not in ("PT", "UPT"):
                    out[_reg(ops[0])] = r != 0
        return out
    elif b in ("PLOP3", "UPLOP3") and ".LUT" in ins.op and len(ops) >= 7:
        # PLOP3.LUT Pd, Pe, Pa, Pb, Pc, lut_d, lut_e; known where every value the unknown
        # inputs can take gives the same result.
        inputs = [_value(t, state) for t in ops[2:5]]
        choices = [(v,) if isinstance(v, bool) else (False, True) for v in inputs]
        for dest, lut in ((ops[0], ops[5]), (ops[1], ops[6])):
            results = {bool(int(lut, 16) >> ((a << 2) | (bb << 1) | c) & 1)
                       for a in choices[0] for bb in choices[1] for c in choices[2]}
            if _reg(dest) not in ("PT", "UPT") and len(results) == 1:
                out[_reg(dest)] = results.pop()
        return out
    if known is not None and dests:
        out[dests[0]] = known
    return out


def feasible_successors(bl, succ, fields: Dict[int, int], base: int) -> Dict[int, List[int]]:
    """The successors each block can take with these parameter values (sparse
    conditional constant propagation: a block's state is the meet of its feasible
    predecessors'; unknown stays unknown)."""
    entry: Dict[int, dict] = {0: {}}
    feasible: Dict[int, List[int]] = {}
    work = [0]
    while work:
        n = work.pop()
        state = entry[n]
        for ins in bl[n][:-1]:
            state = transfer(ins, state, fields, base)
        last = bl[n][-1]
        outs = list(succ.get(n, []))
        guard = _value(last.pred[1:], state) if last.pred else None
        if isinstance(guard, bool) and last.base in ("BRA", "JMP", "EXIT", "RET"):
            target = last.branch_target()
            taken = [m for m in outs if bl[m][0].addr == target]
            outs = taken if guard else [m for m in outs if m not in taken]
        state = transfer(last, state, fields, base)
        feasible[n] = outs
        for m in outs:
            if m not in entry:
                entry[m] = dict(state)
                work.append(m)
            else:
                merged = {k: v for k, v in entry[m].items() if state.get(k) == v}
                if merged != entry[m]:
                    entry[m] = merged
                    work.append(m)
    return feasible


# Scoreboard state: a tuple of 6 entries, 0 = idle, 1 = a load in flight since before
# the last counted wait ("old"), 2 = a load issued since ("fresh").
def _step(state: tuple, ins: Instr) -> Tuple[tuple, int]:
    trips = 0
    s = list(state)
    for sb in range(6):
        if ins.ctrl.wait_mask >> sb & 1 and s[sb]:
            if s[sb] == 2:
                trips = 1
            s[sb] = 0
    if trips:
        s = [1 if v else 0 for v in s]  # everything else in flight was waited for once
    if ins.is_global_load() and ins.ctrl.write_barrier < 6:
        s[ins.ctrl.write_barrier] = 2
    return tuple(s), trips


def round_trips(bl, succ, header: int, latch: int) -> Tuple[int, int]:
    """The most dependent global round trips over the paths of one iteration of the
    loop [header, latch] (inner loops once), and the instructions on the longest path."""
    entry: Dict[int, Dict[tuple, Tuple[int, int]]] = {header: {(0,) * 6: (0, 0)}}
    best, best_len = 0, 0
    for n in range(header, latch + 1):
        for state, (trips, length) in entry.get(n, {}).items():
            s, add = state, 0
            for ins in bl[n]:
                s, t = _step(s, ins)
                add += t
            trips2, len2 = trips + add, length + len(bl[n])
            outs = succ.get(n, [])
            forward = [m for m in outs if n < m <= latch]
            if len(forward) < len(outs) or not outs:  # the path ends: back edge or exit
                best, best_len = max(best, trips2), max(best_len, len2)
            for m in forward:
                cur = entry.setdefault(m, {}).get(s)
                entry[m][s] = (trips2, len2) if cur is None else (max(cur[0], trips2), max(cur[1], len2))
    return best, best_len


@dataclasses.dataclass
class KernelAudit:
    name: str
    short: str
    arch: str
    registers: int
    static_smem: int
    local_accesses: int
    loads: Counter          # width in bits -> static count of LDG sites
    stores: Counter
    trips: int              # per row-loop iteration of an all-bf16 LayerNorm call (inner loops once)
    trips_any: int          # the same over every dtype mix (all branches open)
    inner_trips: List[int]  # per iteration of each inner loop that loads (bf16 call)
    instructions: int       # on the longest path through the row loop (bf16 call)


_TYPE_NAMES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "f32",
               "residual_fused::AnyType": "any"}


def _demangle(mangled: str) -> Optional[str]:
    import shutil
    import subprocess

    tool = shutil.which("c++filt")
    if tool is None:
        return None
    out = subprocess.run([tool, mangled], capture_output=True, text=True, timeout=60).stdout.strip()
    return out if out and out != mangled else None


def short_name(mangled: str) -> str:
    """`kernel<args>` with the dtype mix of the rows kernels spelled out, e.g.
    add_norm_fwd_rows_kernel<bf16/bf16/bf16,2,8,512> (forward: x, residual, params;
    backward: dy, residual, params, saved; `any`: the generic kernel)."""
    m = re.match(r"_ZN14residual_fused\d+(\w+?)(I.*)?EvNS_\d+\w+E$", mangled)
    if not m:
        return mangled
    mix = ""
    if "MixI" in mangled:
        full = _demangle(mangled) or ""
        found = re.search(r"Mix<([^>]*)>", full)
        if found:
            types = [_TYPE_NAMES.get(t.strip(), t.strip()) for t in found.group(1).split(",")]
            if "_fwd_" in mangled:
                types = types[:3]
            mix = "any" if set(types) == {"any"} else "/".join(types)
        else:  # no demangler: an unambiguous, if unreadable, tag
            mix = re.search(r"MixI(\w+?)EE", mangled).group(1)
    args = re.findall(r"Li(\d+)E|(?<=E)([fd])(?=L)|I([fd])E", m.group(2) or "")
    flat = ([mix] if mix else []) + [a or b or c for a, b, c in args]
    return f"{m.group(1)}<{','.join(flat)}>" if flat else m.group(1)


# The call the per-row figures describe: every tensor bf16, LayerNorm, not memory-efficient.
# A pointer field's value as its two 32-bit words (read with LDC.64 / ULDC.64).
NONNULL, NULL = (1, 0), (0, 0)
# Pointer fields an older checkout's params may lack (param_offsets leaves them out there).
OPTIONAL_FIELDS = ("mean",)
# An all-bf16 LayerNorm call as autograd makes it (model_facts.kernel_facts sets the
# norm: RMSNorm has no mean).
BF16_CALL = {"AddNormFwdParams": {"is_rms_norm": 0, "x_dtype": 2, "residual_dtype": 2, "weight_dtype": 2,
                                  "bias_dtype": 2, "residual_out_dtype": 2, "mean": NONNULL},
             "AddNormBwdParams": {"is_rms_norm": 0, "memory_efficient": 0, "dy_dtype": 2,
                                  "dresidual_out_dtype": 2, "saved_dtype": 2, "weight_dtype": 2,
                                  "bias_dtype": 2, "dresidual_dtype": 2,
                                  # the forward's mean, as autograd passes it (LayerNorm)
                                  "mean": NONNULL}}


def param_offsets(kernel_dir: str = cubin.KERNEL_DIR) -> Dict[str, Dict[str, int]]:
    """Byte offsets of BF16_CALL's fields in the kernels' parameter structs, as the host
    compiler lays them out (the same layout nvcc uses for a kernel parameter);
    `kernel_dir`: the csrc/kernels whose add_norm.h declares them."""
    import shutil
    import subprocess
    import tempfile

    from . import cuda_emulator

    include = cuda_emulator.cuda_include_dir()
    def run(skip):
        lines = [f'std::printf("{st} {f} %zu\\n", offsetof(residual_fused::{st}, {f}));'
                 for st, fields in BF16_CALL.items() for f in fields if f not in skip]
        src = ("#include <cstddef>\n#include <cstdio>\n#include \"add_norm.h\"\nint main() {\n" + "\n".join(lines)
               + "\n}\n")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "offsets.cpp"), "w") as f:
                f.write(src)
            exe = os.path.join(tmp, "offsets")
            subprocess.run([shutil.which(os.environ.get("CXX", "g++")) or "g++", "-std=c++17", "-I",
                            kernel_dir, "-I", include, os.path.join(tmp, "offsets.cpp"), "-o", exe],
                           check=True, capture_output=True, timeout=300)
            return subprocess.run([exe], check=True, capture_output=True, text=True).stdout

    try:
        out = run(())
    except subprocess.CalledProcessError:  # an older checkout, without the optional fields
        out = run(OPTIONAL_FIELDS)
    offsets: Dict[str, Dict[str, int]] = {}
    for line in out.splitlines():
        st, f, off = line.split()
        offsets.setdefault(st, {})[f] = int(off)
    return offsets


def call_fields(offsets, struct: str) -> Dict[int, object]:
    """{byte offset: value} of BF16_CALL's fields of `struct` that these params have."""
    return {offsets[struct][f]: v for f, v in BF16_CALL[struct].items() if f in offsets[struct]}


def audit_kernel(kernel: cubin.Kernel, instrs: List[Instr], offsets) -> KernelAudit:
    bl, succ = blocks(instrs)
    struct = "AddNormFwdParams" if "_fwd_" in kernel.name else "AddNormBwdParams"
    fields = call_fields(offsets, struct)
    pruned = feasible_successors(bl, succ, fields, PARAM_BASE[kernel.arch])
    trips, trips_any, inner, length = 0, 0, [], 0
    lp = loops(bl, pruned)
    if lp:
        header, latch = lp[0]
        trips, length = round_trips(bl, pruned, header, latch)
        for h, l in lp[1:]:
            if header <= h and l <= latch:
                t = round_trips(bl, pruned, h, l)[0]
                if t:
                    inner.append(t)
    lp_any = loops(bl, succ)
    if lp_any:
        trips_any = round_trips(bl, succ, *lp_any[0])[0]
    return KernelAudit(
        kernel.name, short_name(kernel.name), kernel.arch, kernel.registers, kernel.static_smem,
        sum(1 for i in instrs if i.base in ("LDL", "STL")),
        Counter(i.width() for i in instrs if i.is_global_load()),
        Counter(i.width() for i in instrs if i.is_global_store()),
        trips, trips_any, inner, length)


def audit(build: cubin.Build, arch: str = "90") -> Dict[str, KernelAudit]:
    """Every kernel of one architecture."""
    offsets = param_offsets()
    out = {}
    for (source, a), text in build.sass.items():
        if a != arch:
            continue
        for name, instrs in parse_sass(text).items():
            if (name, arch) in build.kernels:
                out[name] = audit_kernel(build.kernel(name, arch), instrs, offsets)
    return out
