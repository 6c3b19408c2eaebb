"""The JavaScript client as a frontend installs it: ``npm pack``'s tarball in a scratch project.

The tarball is installed without a registry (``npm install --offline``: the
package has no dependencies; React and its types for the hook's examples come
from the npm cache that ``make install`` filled from frontend/package-lock.json,
with the integrity that lock file pins). In that project, with the types the
tarball ships:

- every JavaScript/TypeScript block of README.md, clients/js/README.md and
  docs/FRONTEND.md compiles (``tsc --noEmit --strict``), with the app's own
  objects they mention declared in tests/js/consumer/doc-globals.d.ts;
- a consumer (tests/js/consumer/consumer.ts) type-checks, compiles and
  streams a job from a real gateway, exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT
from tests.js_harness import NODE_MODULES, ROOT, run_node, running_harness

pytestmark = pytest.mark.skipif(
    (shutil.which("node") is None or shutil.which("npm") is None) and not os.environ.get("CI"),
    reason="node or npm is missing",
)

TSC = NODE_MODULES / "typescript" / "bin" / "tsc"
CONSUMER = ROOT / "tests" / "js" / "consumer"
DOCS = ("README.md", "clients/js/README.md", "docs/FRONTEND.md")
CODE_BLOCK = re.compile(r"^```(js|javascript|ts|typescript|jsx|tsx)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# React's types need csstype; installed together, nothing is left to resolve from the registry.
LOCKED_FOR_EXAMPLES = ("react", "@types/react", "csstype")
COMPILER_OPTIONS = {
    "strict": True,
    "target": "es2022",
    "module": "nodenext",
    "moduleResolution": "nodenext",
    "lib": ["es2022", "dom", "dom.iterable"],
    "types": [],
    "jsx": "react-jsx",
    "skipLibCheck": False,
}


@dataclass(frozen=True)
class Installed:
    project: Path
    tarball: Path
    files: list[str]


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """``npm pack`` the client, and install the tarball into a fresh project."""
    packs = tmp_path_factory.mktemp("packs")
    (report,) = json.loads(_run(["npm", "pack", "--json", "--pack-destination", str(packs)], ROOT / "clients/js"))
    tarball = packs / report["filename"]
    project = tmp_path_factory.mktemp("consumer")
    (project / "package.json").write_text(json.dumps({"name": "consumer", "private": True, "type": "module"}))
    # React and its types for the hook's examples, exactly as frontend/package-lock.json pins them, from
    # the npm cache its `npm ci` filled. By tarball URL: `npm ci` fetched those without the packuments a
    # name@version would need, so only the URLs are in the cache of a fresh CI machine.
    registry = _run(["npm", "config", "get", "registry"], project).strip().rstrip("/")
    react = [_tarball_url(registry, name) for name in LOCKED_FOR_EXAMPLES]
    _run(["npm", "install", "--offline", "--no-audit", "--no-fund", "--loglevel=error", str(tarball), *react], project)
    for name in ("consumer.ts", "doc-globals.d.ts"):
        shutil.copy(CONSUMER / name, project / name)
    return Installed(project, tarball, sorted(entry["path"] for entry in report["files"]))


def _locked(name: str) -> dict[str, Any]:
    lock = json.loads((ROOT / "frontend" / "package-lock.json").read_text())
    return dict(lock["packages"][f"node_modules/{name}"])


def _tarball_url(registry: str, name: str) -> str:
    return f"{registry}/{name}/-/{name.rsplit('/', 1)[-1]}-{_locked(name)['version']}.tgz"


def test_the_tarball_ships_the_client_its_types_and_readme_only(installed: Installed):
    assert installed.files == [
        "README.md", "package.json", "src/events.d.ts", "src/index.d.ts", "src/index.js", "src/react.d.ts",
        "src/react.js", "src/sse.js",
    ]  # fmt: skip
    package = json.loads((installed.project / "node_modules/@candle-gateway/client/package.json").read_text())
    assert package["name"] == "@candle-gateway/client"
    assert "dependencies" not in package, "the client has no runtime dependencies"
    assert package["peerDependenciesMeta"]["react"]["optional"] is True, "React only for the /react entry"
    lock = json.loads((installed.project / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@candle-gateway/client"]["resolved"].startswith("file:")
    for name in LOCKED_FOR_EXAMPLES:
        assert lock["packages"][f"node_modules/{name}"]["integrity"] == _locked(name)["integrity"], name


def doc_blocks() -> list[tuple[str, str, str]]:
    """(file name, language, code) of every JavaScript/TypeScript block of the docs."""
    blocks = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for number, match in enumerate(CODE_BLOCK.finditer(text), start=1):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{doc.replace('/', '_').removesuffix('.md')}-{number}-line{line}"
            blocks.append((name, match.group(1), match.group(2)))
    return blocks


async def _tsc(project: Path, include: list[str]) -> tuple[int, str]:
    config = project / f"tsconfig.{len(include)}.{abs(hash(tuple(include)))}.json"
    config.write_text(json.dumps({"compilerOptions": {**COMPILER_OPTIONS, "noEmit": True}, "include": include}))
    return await run_node([str(TSC), "-p", str(config)], dict(os.environ), timeout_s=120)


def _write_block(project: Path, name: str, language: str, code: str) -> str:
    suffix = ".tsx" if language in ("jsx", "tsx") else ".ts"
    path = project / "doc-blocks" / f"{name}{suffix}"
    path.parent.mkdir(exist_ok=True)
    # `export {}`: every block is its own module, as it is in an app (no names shared between blocks).
    path.write_text(f"{code}\nexport {{}};\n")
    return str(path.relative_to(project))


async def test_every_code_block_of_the_readmes_compiles_against_the_packed_types(installed: Installed):
    blocks = doc_blocks()
    by_doc = {doc: [name for name, _, _ in blocks if name.startswith(doc.replace("/", "_").removesuffix(".md"))]
              for doc in DOCS}  # fmt: skip
    assert all(by_doc.values()), f"a doc without a code block to check: {by_doc}"
    files = [_write_block(installed.project, *block) for block in blocks]
    code, output = await _tsc(installed.project, [*files, "doc-globals.d.ts"])
    assert code == 0, output


async def test_the_doc_block_check_fails_on_a_field_read_before_narrowing(installed: Installed):
    # The README's old example: `interval` is not a field of every event, so this must not compile.
    wrong = """import { openCandleStream } from "@candle-gateway/client";
openCandleStream({ id: jobId, intervals: "day", getToken, onEvent(event, state) {
  const interval = state.intervals[event.data.interval];
  if (event.event === "data_chunk") charts[interval.interval].update(event.data.data_points);
} });"""
    code, output = await _tsc(
        installed.project, [_write_block(installed.project, "wrong", "js", wrong), "doc-globals.d.ts"]
    )
    assert code != 0
    assert "TS2339" in output and "'interval'" in output, output


async def test_a_consumer_of_the_tarball_type_checks_and_streams_from_a_real_gateway(
    installed: Installed, settings, signing_key, tmp_path
):
    project = installed.project
    config = project / "tsconfig.consumer.json"
    config.write_text(json.dumps({"compilerOptions": {**COMPILER_OPTIONS, "outDir": "out"}, "files": ["consumer.ts"]}))
    code, output = await run_node([str(TSC), "-p", str(config)], dict(os.environ), timeout_s=120)
    assert code == 0, output
    async with running_harness(settings, signing_key, PROJECT, tmp_path / "valkey") as harness:
        await harness.create_job("packed-job", {"day": 30, "minute": 420}, uid="consumer", status="completed")
        env = {**os.environ, "GATEWAY_URL": harness.gateway_url, "CONTROL_URL": harness.control_url,
               "JOB_ID": "packed-job"}  # fmt: skip
        code, output = await run_node([str(project / "out" / "consumer.js")], env, timeout_s=60)
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["status"] == "complete"
    assert result["points"] == {"day": 30, "minute": 420}
    first = result["minuteTimes"][0]
    assert result["minuteTimes"] == [first + i * 60_000 for i in range(420)], "exactly the stored series, in order"
    assert result["statuses"] == {"day": ["streaming"], "minute": ["streaming"] * 9}
    assert result["iterated"] == 450
    assert result["missing"] == "job_not_found"


async def test_the_react_entry_resolves_through_the_exports_map(installed: Installed):
    check = installed.project / "check-react.mjs"
    check.write_text(
        'const hook = await import("@candle-gateway/client/react");\n'
        'const client = await import("@candle-gateway/client");\n'
        "console.log(typeof hook.useCandleStream, typeof client.openCandleStream);\n"
    )
    code, output = await run_node([str(check)], dict(os.environ), timeout_s=30)
    assert code == 0, output
    assert output.strip() == "function function"
