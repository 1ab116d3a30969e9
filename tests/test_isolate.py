"""run_isolated: results, errors and native crashes of a child process, stdout kept clean."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fleet.artifacts.inputs import parse_input_shapes
from fleet.artifacts.isolate import run_isolated
from fleet.core.errors import ConversionError, InvalidModelError, UsageError
from tests.conftest import REPO

# The functions run in the child are stdlib/fleet functions: a child imports the module of
# its function, and this test module imports pytest and the registry (seconds per child).

def test_value_and_kwargs_come_back() -> None:
    out = run_isolated(np.add, np.arange(4), 1, what="add", error=InvalidModelError)
    assert out.tolist() == [1, 2, 3, 4]
    assert run_isolated(int, "ff", base=16, what="int", error=InvalidModelError) == 255


def test_fleet_error_keeps_its_class_message_and_details() -> None:
    with pytest.raises(UsageError) as info:
        run_isolated(parse_input_shapes, ["x=1,2", "x=3"], what="x", error=InvalidModelError)
    assert type(info.value) is UsageError
    assert info.value.message == "--input-shape names 'x' twice"
    assert info.value.details == {"input": "x"}


def test_other_exception_becomes_the_callers_class_in_one_line() -> None:
    with pytest.raises(ConversionError) as info:
        run_isolated(int, "seven", what="converting m.onnx", error=ConversionError)
    assert str(info.value) == "converting m.onnx: ValueError: invalid literal for int() " \
        "with base 10: 'seven'"


@pytest.mark.parametrize(("sig", "name"), [(signal.SIGFPE, "SIGFPE"),
                                           (signal.SIGSEGV, "SIGSEGV"),
                                           (signal.SIGILL, "SIGILL"),
                                           (signal.SIGABRT, "SIGABRT")])
def test_native_crash_is_an_error_naming_the_signal(sig: int, name: str) -> None:
    with pytest.raises(InvalidModelError, match=rf"^validating m\.mnn: MNN crashed \({name}\)$"):
        run_isolated(signal.raise_signal, sig, what="validating m.mnn",
                     error=InvalidModelError)
    # the parent is unharmed and the next call works
    assert run_isolated(np.add, 1, 1, what="x", error=InvalidModelError) == 2


def test_silent_exit_and_timeout() -> None:
    with pytest.raises(ConversionError, match="exited with status 3"):
        run_isolated(os._exit, 3, what="c", error=ConversionError)
    with pytest.raises(ConversionError, match=r"timed out after 0\.5 s"):
        run_isolated(time.sleep, 30.0, what="c", error=ConversionError, timeout_s=0.5)


def test_child_stdout_goes_to_stderr() -> None:
    code = ("import sys; from fleet.artifacts.isolate import run_isolated;"
            "from fleet.core.errors import InvalidModelError;"
            "import os\n"
            "if __name__ == '__main__':\n"
            "    r = run_isolated(os.write, 1, b'NATIVE BANNER\\n', what='p',\n"
            "                     error=InvalidModelError)\n"
            "    print('RESULT', r)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    assert proc.stdout == "RESULT 14\n"
    assert "NATIVE BANNER" in proc.stderr
