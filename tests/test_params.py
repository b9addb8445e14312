"""The kernels' parameter blocks: each dtype of xattn/params.py (NumPy) against its struct in
kernels_common/params.h (C), field by field, with the host C compiler (gcc, on CI too). A field
added to one and not the other, or in another place, fails here on the CPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xattn import params

PARAMS_H = Path(__file__).resolve().parents[1] / "kernels_common" / "params.h"


def _leaves(dtype, prefix=""):
    """(C member path, offset) of every scalar field, in order."""
    for name in dtype.names:
        field, offset = dtype.fields[name][:2]
        if field.names:
            for sub, sub_offset in _leaves(field, f"{prefix}{name}."):
                yield sub, offset + sub_offset
        else:
            yield prefix + name, offset


STRUCTS = sorted(params.STRUCTS.items())


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler (gcc) here")
@pytest.mark.parametrize("struct, dtype", STRUCTS)
def test_params_layout_matches_the_c_struct(tmp_path, struct, dtype):
    leaves = list(_leaves(dtype))
    lines = [f'#include "{PARAMS_H}"', "#include <stdio.h>", "#include <stddef.h>",
             "int main(void) {", f'  printf("size %zu\\n", sizeof(struct {struct}));']
    lines += [f'  printf("{path} %zu\\n", offsetof(struct {struct}, {path}));' for path, _ in leaves]
    lines += ["  return 0;", "}"]
    source = tmp_path / "offsets.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "offsets"
    subprocess.run(["gcc", "-std=c11", "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    printed = dict(line.split() for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                          text=True).stdout.splitlines())
    assert int(printed.pop("size")) == dtype.itemsize
    assert {path: int(offset) for path, offset in printed.items()} == dict(leaves)


@pytest.mark.parametrize("struct, dtype", STRUCTS)
def test_every_c_member_has_a_numpy_field(struct, dtype):
    """The other direction: members named in the C struct's body are all in the dtype (a member
    added in C only would otherwise shift nothing the offset test sees if it is the last one)."""
    text = PARAMS_H.read_text()
    body = text[text.index(f"struct {struct} {{"):]
    body = body[:body.index("};")]
    members = []
    for line in body.splitlines()[1:]:
        code = line.split("//")[0].strip().rstrip(";")
        if code:
            members += [name.strip().lstrip("*") for name in code.split(None, 1)[1].replace("TensorRef", "").split(",")]
    members = [m.split()[-1].lstrip("*") for m in members]
    assert members == list(dtype.names)
