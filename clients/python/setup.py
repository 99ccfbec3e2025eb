"""Build hook: generate the protobuf stubs into the built package.

The stubs are never committed (see dsync_client/codegen.py). Building a
wheel from a checkout runs protoc on the repository's proto/ and ships the
result in dsync_client/_gen/; an editable install (`pip install -e .`)
generates them on first import instead.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _codegen():
    # Loaded by path: importing the package would need its dependencies.
    spec = importlib.util.spec_from_file_location("_dsync_codegen", HERE / "dsync_client" / "codegen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        codegen = _codegen()
        out = Path(self.build_lib) / "dsync_client" / "_gen"
        if (codegen.DEFAULT_PROTO_DIR / "dsync").is_dir():
            codegen.generate(codegen.DEFAULT_PROTO_DIR, out)
        elif (codegen.GEN_DIR / codegen.MARKER).is_file():
            self.copy_tree(str(codegen.GEN_DIR), str(out))
        else:
            raise SystemExit(
                f"no protos at {codegen.DEFAULT_PROTO_DIR} and no generated stubs: "
                "build from a dsync checkout (clients/python)"
            )


setup(cmdclass={"build_py": BuildPyWithStubs})
