"""Static resource figures of one compiled kernel: ptxas ``-v`` log, SASS opcodes, PTX loads, H100 occupancy.

Pure text analysis (no Triton, no GPU): the inputs are what :mod:`tests.compile_harness` stores for a compiled
kernel, i.e. ptxas's verbose log, the ``cuobjdump -sass`` listing of the sm_90a cubin and the PTX.

Definitions used by the resource test (``tests/test_static_resources.py``) and the report (``benches/STATIC.md``):

* **global load width**: bytes one thread moves with one instruction: ``ld.global[.vN].bB`` moves N·B/8 bytes,
  ``cp.async.*.shared.global [dst], [src], S`` moves S bytes (S = 4, 8 or 16). In SASS these are ``LDG.E[.W]`` and
  ``LDGSTS.E[...][.W]`` (``.W`` absent = 32-bit); the PTX and SASS counts match one to one, since ptxas keeps the
  vector width of a global access.
* **main loop**: the instructions of the kernel's loops, i.e. every PTX line between a label and a later branch
  back to it (software-pipelined loops included; their peeled prologue is outside). A kernel without any loop
  does all its work in one pass, so all of it counts as its main loop.
* **operand of a load**: the kernel argument its address is computed from. Each ``ld.param`` of a pointer
  argument seeds that argument; every instruction other than a load passes the union of its sources' arguments to
  its destinations (a loaded value is data, not an address, so index loads such as ``ids_keep`` do not taint the
  gathered address); iterated to a fixed point. A load whose address derives from no argument or from several is
  reported with operand ``?``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# ---- ptxas -v -------------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas_log(log: str) -> dict:
    """``{"regs", "spill_stores", "spill_loads", "stack"}`` (bytes) from ptxas's ``-v`` output for one kernel."""
    regs = _REGS.search(log)
    if regs is None:
        raise ValueError(f"no register count in the ptxas log:\n{log[-2000:]}")
    spill = _SPILL.search(log)
    stack = _STACK.search(log)
    return {
        "regs": int(regs.group(1)),
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "stack": int(stack.group(1)) if stack else 0,
    }


# ---- SASS -----------------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_WIDTHS = ("U8", "S8", "U16", "S16", "64", "128")
GLOBAL_OPS = ("LDG", "LDGSTS", "STG", "ATOMG", "REDG", "RED", "UBLKCP", "UTMALDG", "UTMASTG")
MMA_OPS = {"HGMMA": "wgmma", "HMMA": "mma.sync", "IMMA": "mma.sync", "DMMA": "mma.sync"}


def sass_opcodes(sass: str) -> list[str]:
    """The opcode (with modifiers) of every instruction of a ``cuobjdump -sass`` listing, in order."""
    return [m.group(1) for m in map(_SASS_LINE.match, sass.splitlines()) if m]


def global_access_name(opcode: str) -> str | None:
    """``"LDG.128"``-style name of a global memory opcode (base op + width, 32 when unsuffixed), else None."""
    base, *mods = opcode.split(".")
    if base not in GLOBAL_OPS:
        return None
    width = next((m for m in reversed(mods) if m in _WIDTHS), "32")
    return f"{base}.{width}"


def sass_summary(sass: str) -> dict:
    """``{"global": Counter of LDG.128-style names, "mma": Counter of wgmma / mma.sync instruction counts}``."""
    glob, mma = Counter(), Counter()
    for op in sass_opcodes(sass):
        name = global_access_name(op)
        if name:
            glob[name] += 1
        kind = MMA_OPS.get(op.split(".")[0])
        if kind:
            mma[kind] += 1
    return {"global": dict(sorted(glob.items())), "mma": dict(sorted(mma.items()))}


# ---- PTX ------------------------------------------------------------------------------------------------------

_REG = re.compile(r"%[a-z]+\d+\b")
_LABEL = re.compile(r"^(\$L__\w+):")
_PARAM = re.compile(r"\[\s*(\w+)_param_(\d+)\s*\]")
_LOC = re.compile(r"^\.loc\s+(\d+)\s+(\d+)\s+\d+")
_FILE = re.compile(r'^\.file\s+(\d+)\s+"([^"]+)"')
_VEC = re.compile(r"^v(\d+)$")
_TYPE = re.compile(r"^[bsuf](\d+)$|^bf16$")
# Instructions whose first operand is not a register they define (or whose result is data, not an address).
_NO_TAINT_PREFIXES = ("st.", "cp.", "red.", "bra", "bar", "ret", "exit", "fence", "membar", "prefetch", "mbarrier")
_DATA_PREFIXES = ("ld.", "atom.", "wgmma", "mma", "ldmatrix", "shfl", "vote", "tex", "suld")


@dataclass
class GlobalAccess:
    """One global memory instruction of the PTX."""

    kind: str  # "ld", "cp.async" (global -> shared, a load) or "st"
    width: int  # bytes per thread
    operand: str  # kernel argument the address derives from, "?" when not exactly one
    in_loop: bool
    where: str  # source file:line of the instruction (Triton's line info), "" when none


@dataclass
class PtxReport:
    has_loop: bool
    accesses: list[GlobalAccess] = field(default_factory=list)

    def main_loop_loads(self) -> list[GlobalAccess]:
        """Loads of the main loop (see the module docstring): loop bodies, or everything when there is no loop."""
        return [a for a in self.accesses if a.kind != "st" and (a.in_loop or not self.has_loop)]


def _split_operands(text: str) -> list[str]:
    """Top-level comma split (braces and brackets group)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _width(opcode: str) -> int:
    """Bytes moved by an ``ld``/``st`` opcode, from its ``.vN`` and type modifiers."""
    vec, bits = 1, None
    for mod in opcode.split(".")[1:]:
        if m := _VEC.match(mod):
            vec = int(m.group(1))
        elif m := _TYPE.match(mod):
            bits = int(m.group(1)) if m.group(1) else 16
    if bits is None:
        raise ValueError(f"cannot tell the width of {opcode!r}")
    return vec * bits // 8


def _statements(ptx: str):
    """(opcode, operands, label, loc) per PTX statement; label/loc are set on their own pseudo-statements."""
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if m := _LABEL.match(line):
            yield "label", [], m.group(1), None
            line = line[m.end() :].strip()
            if not line:
                continue
        if m := _LOC.match(line):
            yield "loc", [], None, (int(m.group(1)), int(m.group(2)))
            continue
        if m := _FILE.match(line):
            yield "file", [m.group(2)], m.group(1), None
            continue
        for stmt in line.split(";"):
            stmt = stmt.strip().lstrip("{}").strip()
            if not stmt or stmt.startswith("."):
                continue
            if stmt.startswith("@"):
                stmt = stmt.split(None, 1)[1] if " " in stmt else ""
            parts = stmt.split(None, 1)
            if not parts:
                continue
            yield parts[0], _split_operands(parts[1]) if len(parts) > 1 else [], None, None


def analyze_ptx(ptx: str, arg_names: list[str], pointer_args: set[str]) -> PtxReport:
    """Global accesses of a one-kernel PTX with their width, operand and main-loop membership.

    ``arg_names``: the kernel's non-constexpr arguments in order (PTX ``_param_i`` is ``arg_names[i]``; Triton
    appends scratch pointers after them, which never count as operands). ``pointer_args``: those that are pointers.
    """
    stmts = list(_statements(ptx))
    files = {idx: path.rsplit("/", 1)[-1] for op, ops, idx, _ in stmts if op == "file" for path in ops}
    instrs, labels, branches, loc = [], {}, [], None
    for op, ops, label, where in stmts:
        if op == "label":
            labels[label] = len(instrs)
        elif op == "loc":
            loc = where
        elif op != "file":
            if op.startswith("bra") and ops:
                branches.append((len(instrs), ops[-1].strip()))
            instrs.append((op, ops, loc))
    loops = [(labels[t], i) for i, t in branches if t in labels and labels[t] <= i]
    bit = {name: 1 << i for i, name in enumerate(arg_names)}

    taint: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for op, ops, _ in instrs:
            if not ops or op.startswith(_NO_TAINT_PREFIXES):
                continue
            if op.startswith("ld.param"):
                m = _PARAM.search(ops[-1])
                src = 0
                if m and int(m.group(2)) < len(arg_names) and arg_names[int(m.group(2))] in pointer_args:
                    src = bit[arg_names[int(m.group(2))]]
            elif op.startswith(_DATA_PREFIXES):
                continue
            else:
                src = 0
                for o in ops[1:]:
                    for r in _REG.findall(o):
                        src |= taint.get(r, 0)
            if not src:
                continue
            for r in _REG.findall(ops[0]):
                if taint.get(r, 0) | src != taint.get(r, 0):
                    taint[r] = taint.get(r, 0) | src
                    changed = True

    def operand(addr: str) -> str:
        mask = 0
        for r in _REG.findall(addr):
            mask |= taint.get(r, 0)
        names = [n for n in arg_names if mask & bit[n]]
        return names[0] if len(names) == 1 else "?"

    report = PtxReport(has_loop=bool(loops))
    for idx, (op, ops, where) in enumerate(instrs):
        if op.startswith("ld.global"):
            kind, width, addr = "ld", _width(op), ops[-1]
        elif op.startswith("st.global"):
            kind, width, addr = "st", _width(op), ops[0]
        elif op.startswith("cp.async") and ".global" in op and len(ops) >= 2:
            kind, addr = "cp.async", ops[1]
            width = 16 if ".bulk" in op else int(ops[2], 0)
        else:
            continue
        in_loop = any(lo <= idx <= hi for lo, hi in loops)
        src = f"{files.get(str(where[0]), '?')}:{where[1]}" if where else ""
        report.accesses.append(GlobalAccess(kind, width, operand(addr), in_loop, src))
    return report


# ---- occupancy on an H100 (SXM5, sm_90) -----------------------------------------------------------------------

H100 = {
    "sms": 132,
    "regs_per_sm": 65536,
    "reg_alloc_unit": 256,  # registers, per warp
    "warp_alloc_granularity": 4,  # warps limited by registers are floored to a multiple of this
    "max_warps_per_sm": 64,
    "max_ctas_per_sm": 32,
    "smem_per_sm": 233472,  # 228 KiB
    "smem_reserved_per_cta": 1024,
    "smem_alloc_unit": 128,
}


def occupancy(regs: int, smem: int, num_warps: int, ctas: int, gpu: dict = H100) -> dict:
    """Resident CTAs and warps per SM from registers/thread, shared bytes/CTA and warps/CTA; waves of a grid."""
    per_warp = -(-regs * 32 // gpu["reg_alloc_unit"]) * gpu["reg_alloc_unit"]
    warps_by_regs = gpu["regs_per_sm"] // per_warp
    warps_by_regs -= warps_by_regs % gpu["warp_alloc_granularity"]
    unit = gpu["smem_alloc_unit"]
    smem_cta = -(-(smem + gpu["smem_reserved_per_cta"]) // unit) * unit
    limits = {  # on a tie the hardware maxima are named first
        "warps": gpu["max_warps_per_sm"] // num_warps,
        "ctas": gpu["max_ctas_per_sm"],
        "smem": gpu["smem_per_sm"] // smem_cta,
        "regs": warps_by_regs // num_warps,
    }
    per_sm = min(limits.values())
    return {
        "ctas_per_sm": per_sm,
        "warps_per_sm": per_sm * num_warps,
        "limited_by": min(limits, key=limits.get),
        "waves": ctas / (per_sm * gpu["sms"]) if per_sm else float("inf"),
    }


# ---- alignment of a kernel operand and the summary of one compiled launch ----------------------------------------


def rows_aligned(tensor: dict) -> bool:
    """Whether every row of the tensor, i.e. every run along its innermost dimension of size > 1, is 16-byte
    aligned: that dimension has unit stride and spans a multiple of 16 bytes, and every other stride is a multiple
    of 16 bytes (the start address is the launcher's concern: see :func:`aligned_operands`). A tensor of one
    element is not."""
    size = tensor["itemsize"]
    dims = [(n, stride) for n, stride in zip(tensor["shape"], tensor["strides"]) if n != 1]
    if not dims:
        return False
    (n, stride), outer = dims[-1], dims[:-1]
    return stride == 1 and n * size % 16 == 0 and all(s * size % 16 == 0 for _, s in outer)


def aligned_operands(launch) -> set[str]:
    """Tensor arguments whose data is 16-byte aligned: marked divisible by 16 by the launcher (the pointer) and
    :func:`rows_aligned` (the layout)."""
    return {name for name, t in launch.tensors.items() if launch.divisible(name) and rows_aligned(t)}


def summarize(launch, artifacts: dict) -> dict:
    """The figures of one compiled launch: ptxas, occupancy, SASS mix, and its main-loop loads (see the module
    docstring) with ``narrow``: those under 16 bytes from an aligned operand (or an unresolved one, ``?``)."""
    ptxas = parse_ptxas_log(artifacts["ptxas_log"])
    warps = launch.options["num_warps"]
    ctas = 1
    for g in launch.grid:
        ctas *= g
    occ = occupancy(ptxas["regs"], artifacts["shared"], warps, ctas)
    names = launch.arg_names()
    ptx = analyze_ptx(artifacts["ptx"], names, {n for n in names if launch.signature[n].startswith("*")})
    aligned = aligned_operands(launch)
    loads = ptx.main_loop_loads()
    narrow = Counter(
        (a.operand, a.width, a.where) for a in loads if a.width < 16 and (a.operand in aligned or a.operand == "?")
    )
    return {
        **ptxas,
        "shared": artifacts["shared"],
        **occ,
        **sass_summary(artifacts["sass"]),
        "has_loop": ptx.has_loop,
        "aligned": sorted(aligned),
        "main_loads": dict(Counter(f"{a.operand}:{a.width}B" for a in loads)),
        "narrow": [{"operand": o, "bytes": w, "where": s, "count": c} for (o, w, s), c in sorted(narrow.items())],
    }
