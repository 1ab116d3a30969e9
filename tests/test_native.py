"""The native module's clock and memory helpers, and its .pyi stub against the real module."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import fleet_agent
from fleet_agent import _native, native

MIB = 1024 * 1024
STUB = Path(fleet_agent.__file__).with_name("_native.pyi")
ROOT = Path(__file__).resolve().parents[1]


def test_monotonic_ns_tracks_time_monotonic() -> None:
    a, ta = native.monotonic_ns(), time.monotonic_ns()
    time.sleep(0.05)
    b, tb = native.monotonic_ns(), time.monotonic_ns()
    assert b > a
    # the same clock (CLOCK_MONOTONIC) as Python's: the deltas agree within 5 ms
    assert abs((b - a) - (tb - ta)) < 5_000_000


def test_rss_readers_see_an_allocation() -> None:
    before = native.current_rss_bytes()
    block = bytearray(96 * MIB)  # zero-filled by calloc: touch it so it is resident
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    after = native.current_rss_bytes()
    assert after - before > 80 * MIB
    # the kernel's peak counters are updated lazily from approximate per-CPU counts
    slack = 4 * MIB
    assert native.peak_rss_bytes() >= after - slack
    assert native.hwm_rss_bytes() >= after - slack
    del block


def test_reset_peak_rss_lowers_the_high_water_mark() -> None:
    block = bytearray(128 * MIB)
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    del block
    high = native.hwm_rss_bytes()
    assert native.reset_peak_rss() is True
    assert native.hwm_rss_bytes() < high - 100 * MIB


def test_native_reexports_everything_public() -> None:
    public = {n for n in dir(_native) if not n.startswith("_")}
    assert set(native.__all__) == public


# -- the stub ----------------------------------------------------------------------------
def test_stubtest_finds_no_difference() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fleet_agent._native", "--mypy-config-file",
         str(ROOT / "pyproject.toml")],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stub_signatures() -> dict[str, list[tuple[str, str | None]]]:
    """name -> [(parameter, default source)] for every function and method in the stub."""
    tree = ast.parse(STUB.read_text())
    out: dict[str, list[tuple[str, str | None]]] = {}

    def params(fn: ast.FunctionDef) -> list[tuple[str, str | None]]:
        args = fn.args.args
        defaults: list[str | None] = [None] * (len(args) - len(fn.args.defaults))
        defaults += [ast.unparse(d) for d in fn.args.defaults]
        return [(a.arg, d) for a, d in zip(args, defaults, strict=True) if a.arg != "self"]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    is_property = any(ast.unparse(d) == "property" for d in item.decorator_list)
                    if not is_property:
                        out[f"{node.name}.{item.name}"] = params(item)
    return out


def _runtime_signature(doc: str) -> list[tuple[str, str | None]]:
    """pybind11 writes ``name(a: T = default, ...) -> R`` as the first docstring line."""
    first = doc.splitlines()[0]
    inside = first[first.index("(") + 1: first.rindex(") ->")]
    fn = ast.parse(f"def f({_strip_annotations(inside)}): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    args = fn.args.args
    defaults: list[str | None] = [None] * (len(args) - len(fn.args.defaults))
    defaults += [ast.unparse(d) for d in fn.args.defaults]
    return [(a.arg, d) for a, d in zip(args, defaults, strict=True) if a.arg != "self"]


def _strip_annotations(params: str) -> str:
    """Drop ``: type`` parts (pybind's types are not always valid Python expressions)."""
    out, depth, skipping = [], 0, False
    for ch in params:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == ":" and depth == 0:
            skipping = True
            continue
        if skipping and depth == 0 and ch in ",=":
            skipping = False
        if not skipping:
            out.append(ch)
    return "".join(out)


def test_stub_signatures_match_the_module() -> None:
    stub = _stub_signatures()
    runtime: dict[str, list[tuple[str, str | None]]] = {}
    for name in dir(_native):
        obj = getattr(_native, name)
        if callable(obj) and not isinstance(obj, type) and obj.__doc__:
            runtime[name] = _runtime_signature(obj.__doc__)
    functions = {k: v for k, v in stub.items() if "." not in k}
    assert set(functions) == set(runtime)
    for name, params in runtime.items():
        assert stub[name] == params, name
