"""xen/xen_libs.py against Debian's Xen libraries and headers (libxen-dev).

1. Every function the cdef declares resolves in the .so it is meant for.
2. The declarations are those of the headers, checked by the compiler: a C
   file includes the real headers, then declares every function and type a
   second time from OUR cdef text under a renamed identifier, and asserts
   with _Static_assert and __builtin_types_compatible_p that each pair is
   the same type. A wrong parameter type, a missing const, a wrong struct
   tag or a wrong typedef fails to compile, naming what differs.
3. What cffi makes of the same declarations (sizes) matches what C makes of
   the headers, and the constants we copied match the headers' macros.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from xen import abi, xen_libs

INCLUDE = "/usr/include"
HEADERS = [lib.header for lib in xen_libs.LIBRARIES.values()] + ["xen/memory.h", "xen/hvm/hvm_op.h", "xen/io/xs_wire.h"]
PREFIX = "ours_"


def _compiler() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs gcc (scripts/setup installs it)")
    missing = [h for h in HEADERS if not os.path.exists(os.path.join(INCLUDE, h))]
    if missing:
        pytest.skip(f"needs Xen's headers ({', '.join(missing)} missing; scripts/setup installs libxen-dev)")
    return cc


# --- building the check --------------------------------------------------------

_TYPEDEF_NAME = re.compile(r"typedef\s[^;]*?\b(\w+)\s*;")


def declared_typedefs(cdef: str) -> list[str]:
    return _TYPEDEF_NAME.findall(cdef)


def renamed(text: str, typedefs: list[str], functions: list[str]) -> str:
    """``text`` with our typedef and function names prefixed. Struct tags
    stay: they must be the headers' own tags for the types to match."""
    text = re.sub(r"\bstruct\s+", "struct ", text)
    for name in typedefs:
        text = re.sub(rf"(?<!struct )\b{name}\b", PREFIX + name, text)
    for name in functions:
        text = re.sub(rf"\b{name}(\s*\()", rf"{PREFIX}{name}\1", text)
    return text


CONSTANTS = [
    ("XBT_NULL", xen_libs.XBT_NULL),
    ("XS_WATCH_PATH", xen_libs.XS_WATCH_PATH),
    ("XS_WATCH_TOKEN", xen_libs.XS_WATCH_TOKEN),
    ("XENMEM_resource_ioreq_server", abi.XENMEM_RESOURCE_IOREQ_SERVER),
    ("XENMEM_resource_ioreq_server_frame_bufioreq", abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ),
    ("XENMEM_resource_ioreq_server_frame_ioreq(0)", abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ),
    ("HVM_IOREQSRV_BUFIOREQ_OFF", abi.HVM_IOREQSRV_BUFIOREQ_OFF),
    ("HVM_IOREQSRV_BUFIOREQ_ATOMIC", abi.HVM_IOREQSRV_BUFIOREQ_ATOMIC),
    ("XEN_DMOP_IO_RANGE_MEMORY", abi.XEN_DMOP_IO_RANGE_MEMORY),
]


def check_source(types_cdef: str, libraries: dict[str, xen_libs.XenLibrary]) -> str:
    """The C file that compiles only if our declarations match the headers."""
    typedefs = declared_typedefs(types_cdef)
    functions = [name for lib in libraries.values() for name in lib.functions()]
    ours = renamed(types_cdef + "".join(lib.cdef for lib in libraries.values()), typedefs, functions)
    lines = [
        "#define __XEN_TOOLS__ 1",
        "#include <stdint.h>",
        "#include <stddef.h>",
        "#include <stdbool.h>",
        *(f"#include <{h}>" for h in HEADERS),
        "",
        "/* the declarations of xen/xen_libs.py, renamed */",
        ours,
        "",
        "#define SAME(a, b) __builtin_types_compatible_p(a, b)",
    ]
    for name in typedefs:
        lines.append(f'_Static_assert(SAME({name}, {PREFIX}{name}), "typedef {name} differs from the header");')
    for name in functions:
        lines.append(
            f"_Static_assert(SAME(__typeof__(&{name}), __typeof__(&{PREFIX}{name})), "
            f'"{name} differs from its prototype in the header");'
        )
    for expr, value in CONSTANTS:
        lines.append(f'_Static_assert(({expr}) == {value}, "{expr} is not {value}");')
    return "\n".join(lines) + "\n"


def compile_check(cc: str, source: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "xen_libs_check.c"
    path.write_text(source)
    return subprocess.run(
        [cc, "-std=gnu11", "-fsyntax-only", str(path)], capture_output=True, text=True, timeout=60
    )


# --- the tests -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(xen_libs.LIBRARIES))
def test_every_declared_function_resolves_in_its_library(name):
    lib = xen_libs.load(name)
    functions = xen_libs.LIBRARIES[name].functions()
    assert functions
    for function in functions:
        assert getattr(lib, function) is not None, function


def test_declarations_match_the_headers(tmp_path):
    cc = _compiler()
    result = compile_check(cc, check_source(xen_libs.TYPES_CDEF, xen_libs.LIBRARIES), tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_check_catches_a_wrong_parameter_type(tmp_path):
    """The comparison is not vacuous: one changed parameter fails it."""
    cc = _compiler()
    spec = xen_libs.LIBRARIES["xenforeignmemory"]
    assert "uint32_t dom," in spec.cdef
    bad = dict(xen_libs.LIBRARIES)
    bad["xenforeignmemory"] = xen_libs.XenLibrary(
        spec.name, spec.soname, spec.package, spec.header, spec.cdef.replace("uint32_t dom,", "uint16_t dom,")
    )
    result = compile_check(cc, check_source(xen_libs.TYPES_CDEF, bad), tmp_path)
    assert result.returncode != 0
    assert "xenforeignmemory_map differs" in result.stderr
    assert "xenforeignmemory_unmap differs" not in result.stderr


def test_the_check_catches_a_wrong_typedef_and_a_lost_const(tmp_path):
    cc = _compiler()
    types = xen_libs.TYPES_CDEF.replace("typedef uint16_t ioservid_t;", "typedef uint32_t ioservid_t;")
    libs = dict(xen_libs.LIBRARIES)
    spec = libs["xenforeignmemory"]
    libs["xenforeignmemory"] = xen_libs.XenLibrary(
        spec.name, spec.soname, spec.package, spec.header, spec.cdef.replace("const xen_pfn_t arr[]", "xen_pfn_t arr[]")
    )
    result = compile_check(cc, check_source(types, libs), tmp_path)
    assert result.returncode != 0
    assert "typedef ioservid_t differs" in result.stderr
    assert "xendevicemodel_create_ioreq_server differs" in result.stderr
    assert "xenforeignmemory_map differs" in result.stderr


def test_cffi_sizes_match_the_compiled_headers(tmp_path):
    cc = _compiler()
    ffi = xen_libs.ffi()
    scalars = [
        name
        for name in declared_typedefs(xen_libs.TYPES_CDEF)
        if not re.search(rf"typedef\s+struct\s+\w+\s+{name}\s*;", xen_libs.TYPES_CDEF)
    ]
    assert {"domid_t", "ioservid_t", "xen_pfn_t", "evtchn_port_t", "xs_transaction_t"} <= set(scalars)
    source = "\n".join(
        [
            "#define __XEN_TOOLS__ 1",
            "#include <stdio.h>",
            *(f"#include <{h}>" for h in HEADERS),
            "int main(void) {",
            *(f'    printf("{name} %zu %d\\n", sizeof({name}), ({name})-1 < 0);' for name in scalars),
            "    return 0;",
            "}",
        ]
    )
    src, exe = tmp_path / "sizes.c", tmp_path / "sizes"
    src.write_text(source + "\n")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    for line in filter(None, out):
        name, size, signed = line.split()
        assert ffi.sizeof(name) == int(size), name
        assert (int(ffi.cast(name, -1)) < 0) == bool(int(signed)), name


def test_a_missing_library_names_the_so_and_the_debian_package(monkeypatch):
    from xen.hypervisor import HypervisorUnavailable

    spec = xen_libs.LIBRARIES["xendevicemodel"]
    monkeypatch.setitem(
        xen_libs.LIBRARIES,
        "xendevicemodel",
        xen_libs.XenLibrary(spec.name, "libxendevicemodel-absent.so.9", spec.package, spec.header, spec.cdef),
    )
    monkeypatch.setattr(xen_libs, "_loaded", {})
    with pytest.raises(HypervisorUnavailable) as info:
        xen_libs.load("xendevicemodel")
    message = str(info.value)
    assert "libxendevicemodel-absent.so.9" in message
    assert "libxendevicemodel1" in message
    assert "\n" not in message


def test_libraries_load_once():
    assert xen_libs.load("xenevtchn") is xen_libs.load("xenevtchn")
    assert xen_libs.ffi() is xen_libs.ffi()


def test_importing_xen_libs_loads_nothing():
    code = "import sys, xen.xen_libs; sys.exit('cffi' in sys.modules or '_cffi_backend' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0
