"""The wheelhouse rules of ``fleet device bootstrap``, on small installs made in a temp dir."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from fleet.bootstrap import remake_installed_wheel, wheel_board_tag, wheelhouse_from_dir
from fleet.core import errors


def _rec(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _install(site: Path) -> metadata.Distribution:
    """A distribution as pip leaves it: files, dist-info, a launcher outside site-packages."""
    files = {
        "demo/__init__.py": b"",
        "demo/tool.bin": b"\x7fELF...",
        "demo/__pycache__/__init__.cpython-311.pyc": b"bytecode",
        "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                                    b"Tag: cp311-cp311-linux_x86_64\n",
        "demo-1.0.dist-info/entry_points.txt": b"[console_scripts]\ndemo = demo:main\n",
        "demo-1.0.dist-info/INSTALLER": b"pip\n",
        "demo-1.0.dist-info/direct_url.json": b'{"url": "file:///x.whl", "archive_info": {}}',
    }
    lines = []
    for name, data in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(data)
        lines.append(f"{name},," if name.endswith(".pyc") else f"{name},sha256={_rec(data)},"
                     f"{len(data)}")
    (site / "demo" / "tool.bin").chmod(0o755)
    lines += ["../../../bin/demo,sha256=abc,10", "demo-1.0.dist-info/RECORD,,"]
    (site / "demo-1.0.dist-info" / "RECORD").write_text("\n".join(lines) + "\n")
    return metadata.PathDistribution(site / "demo-1.0.dist-info")


def test_a_remade_wheel_holds_the_installed_files_and_is_byte_stable(tmp_path: Path) -> None:
    dist = _install(tmp_path / "site")
    one = remake_installed_wheel(dist, tmp_path / "one")
    two = remake_installed_wheel(dist, tmp_path / "two")
    assert one.name == "demo-1.0-cp311-cp311-linux_x86_64.whl"
    assert one.read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one) as zf:
        names = zf.namelist()
        assert names == ["demo/__init__.py", "demo/tool.bin", "demo-1.0.dist-info/METADATA",
                         "demo-1.0.dist-info/WHEEL", "demo-1.0.dist-info/entry_points.txt",
                         "demo-1.0.dist-info/RECORD"]
        assert (zf.getinfo("demo/tool.bin").external_attr >> 16) & 0o777 == 0o755
        record = zf.read("demo-1.0.dist-info/RECORD").decode().splitlines()
        tool = (tmp_path / "site" / "demo" / "tool.bin").read_bytes()
        assert f"demo/tool.bin,sha256={_rec(tool)},{len(tool)}" in record


def test_an_edited_install_is_not_made_into_a_wheel(tmp_path: Path) -> None:
    dist = _install(tmp_path / "site")
    (tmp_path / "site" / "demo" / "__init__.py").write_text("import os  # local patch\n")
    with pytest.raises(errors.FleetError, match="differs from"):
        remake_installed_wheel(dist, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.whl"))


def test_a_data_file_outside_site_packages_is_refused(tmp_path: Path) -> None:
    dist = _install(tmp_path / "site")
    record = tmp_path / "site" / "demo-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + "../../../share/man/demo.1,sha256=abc,3\n")
    with pytest.raises(errors.FleetError, match="outside site-packages"):
        remake_installed_wheel(dist, tmp_path / "out")


@pytest.mark.parametrize(("name", "tag"), [
    ("mnn_fleet-0.1.0-cp311-cp311-linux_x86_64.whl", "cp311-x86_64"),
    ("mnn_fleet-0.1.0-cp312-cp312-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
     "cp312-aarch64"),
])
def test_the_board_tag_comes_from_the_wheel_name(name: str, tag: str) -> None:
    assert wheel_board_tag(name) == tag


def test_a_pure_wheel_has_no_board_tag() -> None:
    with pytest.raises(errors.UsageError):
        wheel_board_tag("mnn_fleet-0.1.0-py3-none-any.whl")


def test_a_ready_wheelhouse_needs_exactly_one_mnn_fleet_wheel(tmp_path: Path) -> None:
    (tmp_path / "numpy-2.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"x")
    with pytest.raises(errors.UsageError, match="none"):
        wheelhouse_from_dir(tmp_path)
    (tmp_path / "mnn_fleet-0.1.0-cp311-cp311-linux_aarch64.whl").write_bytes(b"x")
    house = wheelhouse_from_dir(tmp_path)
    assert house.tag == "cp311-aarch64" and house.project_wheel.name.startswith("mnn_fleet-")
    assert house.wheels[-1] == house.project_wheel and len(house.wheels) == 2
    (tmp_path / "mnn_fleet-0.2.0-cp311-cp311-linux_aarch64.whl").write_bytes(b"x")
    with pytest.raises(errors.UsageError, match="exactly one"):
        wheelhouse_from_dir(tmp_path)
