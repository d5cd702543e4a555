"""Every code block on the documentation site runs, so the docs cannot rot.

Each page of ``docs/**/*.md`` is executed top to bottom in its own temporary folder:

- ```` ```bash ````, ```` ```sh ````, ```` ```shell ```` blocks: every command line; in
  ```` ```console ```` blocks the lines starting with ``$``. ``cortex ...`` commands run
  in this process (fast); ``cd`` and ``export`` persist for the rest of the page;
  anything else runs in ``bash`` with this environment's ``bin`` first on ``PATH``.
  ``pip install PATH`` of a local package is emulated in the default run (a
  ``.dist-info`` with its entry points on ``sys.path``) and done for real in the slow run.
- ```` ```python ```` blocks: executed in one namespace per page (like a notebook).
- ```` ```yaml ```` blocks: parsed; a mapping whose keys are manifest sections is
  validated with [`load_manifest_text`][cortex.kernel.manifest.load_manifest_text] (a
  fragment such as ``train: ...`` alone is completed with ``cortex: 1`` and a name).
- ```` ```toml ```` blocks: parsed.

Tiny sizes: before ``cortex build``/``train``/``bench`` a manifest in the page's folder
is shrunk in place ([`shrink_manifest`][tests.test_docs_examples.shrink_manifest]: a 32-wide,
2-block core, a few training steps, a 200-document demo corpus), ``--steps`` and
``--max-tokens`` are capped, and ``cortex bench`` always gets ``--quick``. Every page
folder starts with ``examples/`` (the shipped manifests) and the files a reader is
assumed to have: ``notes.jsonl``, ``corpus.jsonl`` (small JSONL corpora) and ``my.yaml``.

Markers, HTML comments on the line(s) right before a fence (invisible on the site):

- ``<!-- file: PATH -->`` write the block to ``PATH`` (yaml/toml/python/text) instead of
  executing it; ``<!-- append: PATH -->`` appends to it;
- ``<!-- fails -->`` every command of the block must fail (exit != 0) with a clean
  message, no traceback; a manifest so marked must fail validation;
- ``<!-- slow: REASON -->`` run only by ``pytest -m slow`` (which also runs every page
  with a ``pip install`` command in a fresh virtual environment, installing for real);
- ``<!-- no-run: REASON -->`` never run (needs the network, a GPU, minutes...).

Skipped blocks are counted and listed by ``test_blocks_that_do_not_run_are_listed``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
YAML = {"yaml", "yml"}
TOML = {"toml"}
MARKS = ("no-run", "slow", "file", "append", "fails")
_MARK = re.compile(r"^\s*<!--\s*(%s)\s*(?::\s*(.*?))?\s*-->\s*$" % "|".join(MARKS))
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)[^`]*$")
_SHELL_SYNTAX = re.compile(r"[|;&<>`]|\$\(")

# --------------------------------------------------------------------------- parsing


@dataclass
class Block:
    """One fenced code block of a page, with its markers."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in SHELL | PYTHON | YAML | TOML


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order (indented fences too, dedented)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        marks: dict[str, str] = {}
        j = start - 1
        while j >= 0 and (mark := _MARK.match(lines[j])):
            marks[mark.group(1)] = (mark.group(2) or "").strip()
            j -= 1
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", marks))
    return out


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and output dropped."""
    lines = block.code.splitlines()
    if block.lang == "console":
        lines = [ln.strip()[1:].strip() for ln in lines if ln.strip().startswith("$")]
    commands, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


# --------------------------------------------------------------------------- tiny sizes

TINY_MODEL = {"dim": 32, "layers": 2, "heads": 2, "context": 32}
TINY_STEPS = 3
TINY_DOCUMENTS = 200


def shrink_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """The same manifest at a size that builds and trains in seconds (a new dict).

    The core becomes at most 32 wide with 2 blocks and a 32-token context; training runs
    ``TINY_STEPS`` steps of at most 4 sequences with evaluation, checkpoints and samples
    every 2 steps; the demo corpus has at most ``TINY_DOCUMENTS`` documents.
    """
    from cortex.kernel.manifest import ModelSection

    data = json.loads(json.dumps(data))  # a deep copy
    defaults = ModelSection()
    model = data.setdefault("model", {})
    for key, cap in TINY_MODEL.items():
        model[key] = min(int(model.get(key, getattr(defaults, key))), cap)
    model["heads"] = 2
    layers = model["layers"]
    if model.get("memory_layers"):
        model["memory_layers"] = sorted({min(int(i), layers - 1) for i in model["memory_layers"]})
    system = data.get("memory_system")
    if isinstance(system, dict) and system.get("key_layer") is not None:
        system["key_layer"] = min(int(system["key_layer"]), layers - 1)
    train = data.get("train")
    if isinstance(train, dict):
        batch = min(int(train.get("batch", 16)), 4)
        train["batch"] = batch
        for key in ("micro_batch", "grad_accum"):
            if train.get(key) is not None and (int(train[key]) > batch or batch % int(train[key])):
                train.pop(key)
        if train.get("micro_batch") and train.get("grad_accum"):
            train.pop("grad_accum")
        train["tokens"] = TINY_STEPS * batch * model["context"]
        train["warmup"] = min(int(train.get("warmup", 100)), 1)
        train["eval_batches"] = 1
        for key in ("eval_every", "checkpoint_every", "sample_every"):
            if int(train.get(key, 1)) > 0:
                train[key] = 2
        train["sample_tokens"] = min(int(train.get("sample_tokens", 64)), 8)
        source = train.get("data", "demo")
        if source == "demo" or (isinstance(source, dict) and source.get("type") == "demo"):
            source = {"type": "demo"} if source == "demo" else source
            settings = source.setdefault("settings", {})
            settings["documents"] = min(int(settings.get("documents", 20000)), TINY_DOCUMENTS)
            train["data"] = source
    return data


def shrink_manifest_file(path: Path) -> None:
    """Rewrite a manifest file at tiny size (comments are lost); other files are left alone."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return
    if not (isinstance(data, dict) and "cortex" in data and "name" in data):
        return
    tiny = shrink_manifest(data)
    if tiny != data:
        path.write_text(yaml.safe_dump(tiny, sort_keys=False, allow_unicode=True), encoding="utf-8")


_CAPS = {"--steps": TINY_STEPS, "--max-tokens": 24, "--vocab-size": 1000, "--seeds": 1}


def tiny_args(argv: list[str]) -> list[str]:
    """``cortex`` arguments at tiny size: caps on steps, tokens, vocabulary and seeds."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name in _CAPS:
            if eq and value.isdigit():
                out[i] = f"{name}={min(int(value), _CAPS[name])}"
            elif not eq and i + 1 < len(out) and out[i + 1].isdigit():
                out[i + 1] = str(min(int(out[i + 1]), _CAPS[name]))
    if len(out) > 1 and out[1] == "bench" and "--quick" not in out:
        out.append("--quick")
    return out


# --------------------------------------------------------------------------- workspace

def manifest_sections() -> set[str]:
    from cortex.kernel.manifest import Manifest

    return set(Manifest.model_fields)


def make_workspace(path: Path) -> Path:
    """A page's folder: ``examples/`` and the files a reader is assumed to have."""
    from cortex_plugins.data.demo import demo_documents

    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "examples", path / "examples", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    docs = [d.text for d in demo_documents(40, seed=7)]
    for name, texts in (("notes.jsonl", docs[:20]), ("corpus.jsonl", docs[20:])):
        (path / name).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                 encoding="utf-8")
    quickstart = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text(encoding="utf-8"))
    quickstart["name"] = "my"
    (path / "my.yaml").write_text(yaml.safe_dump(quickstart, sort_keys=False), encoding="utf-8")
    return path


def check_yaml(block: Block, text: str, venv: Venv | None = None, cwd: Path | None = None) -> None:
    """Parse a YAML block; validate it when it is a manifest or a manifest fragment (in
    ``venv`` when given, where the plugins the page installed are)."""
    from cortex.kernel.errors import CortexError
    from cortex.kernel.manifest import load_manifest_text

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AssertionError(f"{block.where}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not data or not set(data) <= manifest_sections():
        return
    if not {"cortex", "name"} <= set(data):
        text = "cortex: 1\nname: docs-fragment\n" + text
    if venv is not None:
        code = f"from cortex.kernel.manifest import load_manifest_text\nload_manifest_text({text!r}, {block.where!r})\n"
        result = venv.run(f"python - <<'__DOCS__'\n{code}\n__DOCS__", cwd or Path.cwd())
        if "fails" in block.marks:
            assert result.returncode != 0, f"{block.where}: marked <!-- fails --> but the manifest validates"
        else:
            assert result.returncode == 0, f"{block.where}: the manifest does not validate:\n{result.stderr[-3000:]}"
        return
    try:
        load_manifest_text(text, block.where)
    except CortexError as exc:
        if "fails" not in block.marks:
            raise AssertionError(f"{block.where}: the manifest does not validate:\n{exc}") from None
    else:
        assert "fails" not in block.marks, f"{block.where}: marked <!-- fails --> but the manifest validates"


# --------------------------------------------------------------------------- virtual environments


@dataclass
class Venv:
    """A fresh virtual environment that sees this one's packages (torch, Cortex) below its own."""

    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(self.path)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env["PIP_NO_INDEX"] = "1"  # everything a test installs is local
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["COLUMNS"] = "200"  # rich wraps tables to the terminal width; keep names on one line
        return env

    def run(self, command: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=cwd, env={**self.env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)


def make_venv(path: Path) -> Venv:
    """``python -m venv --system-site-packages`` plus a ``.pth`` that adds this environment's
    site-packages after the new one's, and ``cortex``/``pip``/``pytest`` commands.

    The new environment installs its own packages (``pip install``) into itself; torch and
    Cortex come from the environment running the tests, never reinstalled."""
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, capture_output=True, timeout=300)
    venv = Venv(path)
    here = sysconfig.get_paths()["purelib"]
    probe = subprocess.run([str(venv.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True)
    site_dir = Path(probe.stdout.strip())
    (site_dir / "_parent_env.pth").write_text(f"import site; site.addsitedir({here!r})\n", encoding="utf-8")
    for command, module in (("cortex", "cortex.cli.app"), ("pip", "pip"), ("pytest", "pytest")):
        script = venv.bin / command
        script.write_text(f"#!{venv.python}\nimport runpy, sys\nsys.argv[0] = {command!r}\n"
                          f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n", encoding="utf-8")
        script.chmod(0o755)
    return venv


# --------------------------------------------------------------------------- running a page


class PageRunner:
    """Runs the blocks of one page in order, in its own folder."""

    def __init__(self, workspace: Path, monkeypatch: pytest.MonkeyPatch, cortex_cli: Any,
                 venv: Venv | None = None) -> None:
        self.root = workspace
        self.cwd = workspace
        self.mp = monkeypatch
        self.cli = cortex_cli
        self.venv = venv
        self.env: dict[str, str] = {}
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.python_prelude: list[str] = []
        self.site = workspace.parent / "emulated-site"
        self.paths: list[str] = []  # sys.path entries of emulated installs
        self.ran = 0
        if venv is None:
            from cortex_plugins.data import demo

            real = demo.demo_documents

            def capped(n: int, *args: Any, **kwargs: Any):
                return real(min(n, TINY_DOCUMENTS), *args, **kwargs)

            monkeypatch.setattr(demo, "demo_documents", capped)

    # -- blocks

    def run(self, block: Block) -> None:
        target = block.marks.get("file") or block.marks.get("append")
        if block.lang in YAML:
            check_yaml(block, block.code, self.venv, self.cwd)
        elif block.lang in TOML:
            try:
                tomllib.loads(block.code)
            except tomllib.TOMLDecodeError as exc:
                raise AssertionError(f"{block.where}: invalid TOML: {exc}") from None
        elif block.lang in PYTHON:
            compile(block.code, block.where, "exec")
        if target:
            path = self.cwd / target
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a" if "append" in block.marks else "w", encoding="utf-8") as fh:
                fh.write(block.code)
            self.ran += 1
            return
        if block.lang in PYTHON:
            self._python(block)
        elif block.lang in SHELL:
            for command in shell_commands(block):
                self._command(block, command)
        self.ran += 1

    def _python(self, block: Block) -> None:
        if self.venv is not None:
            code = "\n".join([*self.python_prelude, block.code])
            result = self.venv.run(f"python - <<'__DOCS__'\n{code}\n__DOCS__", self.cwd, env=self.env)
            self._check(block, "python block", result.returncode, result.stdout + result.stderr)
            self.python_prelude.append(block.code)
            return
        self.mp.chdir(self.cwd)
        with _env(self.env):
            exec(compile(block.code, block.where, "exec"), self.namespace)  # noqa: S102 - our own docs

    # -- shell commands

    def _command(self, block: Block, command: str) -> None:
        try:
            words = shlex.split(command, comments=True)
        except ValueError as exc:
            raise AssertionError(f"{block.where}: cannot parse {command!r}: {exc}") from None
        if not words:
            return
        env: dict[str, str] = {}
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if not words:
            self.env.update(env)
            return
        if words[0] == "cd" and not _SHELL_SYNTAX.search(command):
            self.cwd = (self.cwd / (words[1] if len(words) > 1 else self.root)).resolve()
            assert self.cwd.is_dir(), f"{block.where}: cd {words[1:]}: no such folder"
            return
        if words[0] == "export" and not _SHELL_SYNTAX.search(command):
            for item in words[1:]:
                key, _, value = item.partition("=")
                self.env[key] = value
            return
        if words[0] == "cortex" and len(words) > 1 and words[1] in ("build", "train", "bench"):
            for word in words[2:]:
                if word.endswith((".yaml", ".yml")) and (self.cwd / word).is_file():
                    shrink_manifest_file(self.cwd / word)
        if words[0] == "cortex" and not _SHELL_SYNTAX.search(command):
            words = tiny_args(words)
            if self.venv is None:
                self.mp.chdir(self.cwd)
                with _env({**self.env, **env}):
                    result = self.cli(*words[1:])
                self._check(block, command, result.exit_code, result.output)
                return
            command = shlex.join(words)
        if words[0] == "pip" and self.venv is None:
            self._emulate_pip(block, words)
            return
        if words[0] == "pip" and words[1:2] == ["install"] and "--no-build-isolation" not in words:
            words.insert(2, "--no-build-isolation")  # offline: build with this environment's setuptools
            command = shlex.join(words)
        if self.venv is not None:
            result = self.venv.run(command, self.cwd, env={**self.env, **env})
        else:
            result = self._bash(command, env)
        self._check(block, command, result.returncode, result.stdout + result.stderr)

    def _check(self, block: Block, what: str, code: int, output: str) -> None:
        if "fails" in block.marks:
            assert code != 0, f"{block.where}: `{what}` should fail but exited 0:\n{output[-3000:]}"
            assert "Traceback" not in output, f"{block.where}: `{what}` failed with a traceback:\n{output[-3000:]}"
        else:
            assert code == 0, (f"{block.where}: `{what}` exited {code}:\n{output[-3000:]}\n"
                               "(fix the docs, or mark the block <!-- slow: why --> or <!-- no-run: why -->)")

    def _bash(self, command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        full = {**os.environ, **self.env, **env}
        full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}"
        if self.paths:
            full["PYTHONPATH"] = os.pathsep.join([*self.paths, full.get("PYTHONPATH", "")])
        return subprocess.run(["bash", "-c", command], cwd=self.cwd, env=full, capture_output=True, text=True,
                              timeout=600)

    def _emulate_pip(self, block: Block, words: list[str]) -> None:
        """``pip install [-e] PATH``: its metadata and entry points on ``sys.path``, no pip."""
        assert words[1:2] == ["install"], f"{block.where}: only `pip install PATH` runs offline; mark the block"
        targets = [w for w in words[2:] if not w.startswith("-")]
        for target in targets:
            project = (self.cwd / target).resolve()
            assert (project / "pyproject.toml").is_file(), (
                f"{block.where}: `pip install {target}` is not a local package; mark the block no-run")
            meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
            dist = self.site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
            dist.mkdir(parents=True, exist_ok=True)
            (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\n"
                                           f"Version: {meta['version']}\n", encoding="utf-8")
            groups = meta.get("entry-points", {})
            (dist / "entry_points.txt").write_text(
                "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                        for group, eps in groups.items()), encoding="utf-8")
            src = project / "src" if (project / "src").is_dir() else project
            for entry in (str(src), str(self.site)):
                if entry not in self.paths:
                    self.paths.append(entry)
                    self.mp.syspath_prepend(entry)

    def close(self) -> None:
        """Forget modules imported from the page's folder."""
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if file.startswith(str(self.root)):
                del sys.modules[name]


class _env:
    """Set environment variables for a block, restoring them afterwards."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: Any) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_page(page: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch, cortex_cli: Any, *,
             slow: bool = False, venv: Venv | None = None) -> PageRunner:
    """Run every block of ``page`` (the slow ones too with ``slow``); returns the runner."""
    runner = PageRunner(make_workspace(workspace), monkeypatch, cortex_cli, venv)
    try:
        for block in parse_blocks(page):
            if not block.runnable or "no-run" in block.marks or ("slow" in block.marks and not slow):
                continue
            runner.run(block)
    finally:
        runner.close()
    return runner


# --------------------------------------------------------------------------- tests


def _page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_blocks_run(page, tmp_path, monkeypatch, cortex_cli):
    run_page(page, tmp_path / "ws", monkeypatch, cortex_cli)


def installs_packages(page: Path) -> bool:
    """Whether ``page`` runs ``pip install`` (then its slow run uses a fresh environment)."""
    return any(block.lang in SHELL and "no-run" not in block.marks
               and any(c.split()[:2] == ["pip", "install"] for c in shell_commands(block))
               for block in parse_blocks(page))


SLOW_PAGES = [p for p in PAGES
              if installs_packages(p) or any("slow" in b.marks and "no-run" not in b.marks for b in parse_blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=_page_id)
def test_page_blocks_run_with_the_slow_ones(page, tmp_path, monkeypatch, cortex_cli):
    """Every block, the slow ones too; a page that installs packages runs in a fresh
    virtual environment where ``pip install`` is real."""
    venv = make_venv(tmp_path / "venv") if installs_packages(page) else None
    run_page(page, tmp_path / "ws", monkeypatch, cortex_cli, slow=True, venv=venv)


def test_blocks_that_do_not_run_are_listed(capsys):
    skipped = []
    total = 0
    for page in PAGES:
        for block in parse_blocks(page):
            if not block.runnable:
                continue
            total += 1
            for mark in ("no-run", "slow"):
                if mark in block.marks:
                    assert block.marks[mark], f"{block.where}: <!-- {mark}: ... --> needs a reason"
                    skipped.append(f"{block.where} [{mark}] {block.marks[mark]}")
    with capsys.disabled():
        print(f"\ndocs: {total} code blocks, {len(skipped)} not run by default:")
        for line in skipped:
            print(f"  {line}")
    assert total > 0


def test_parser_reads_markers_fences_and_commands(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n<!-- file: a.yaml -->\n```yaml\ncortex: 1\n```\n\n"
        "!!! note\n    <!-- no-run: needs the network -->\n    ```bash\n    pip install x \\\n      --pre  # c\n"
        "    # only a comment\n    ```\n\n```console\n$ cortex plugins\noutput line\n```\n",
        encoding="utf-8")
    blocks = [Block(b.page, b.line, b.lang, b.code, b.marks) for b in parse_blocks(page)]
    assert [b.lang for b in blocks] == ["yaml", "bash", "console"]
    assert blocks[0].marks == {"file": "a.yaml"} and blocks[1].marks == {"no-run": "needs the network"}
    assert shell_commands(blocks[1]) == ["pip install x    --pre  # c"]
    assert shell_commands(blocks[2]) == ["cortex plugins"]
    assert tiny_args(["cortex", "train", "r", "--steps", "2000", "--max-tokens=500"]) == [
        "cortex", "train", "r", "--steps", "3", "--max-tokens=24"]
    assert tiny_args(["cortex", "bench", "throughput"])[-1] == "--quick"


def test_shrink_manifest_validates_and_is_small():
    from cortex.kernel.manifest import load_manifest_text

    big = {"cortex": 1, "name": "big", "model": {"dim": 512, "layers": 8, "heads": 8, "context": 1024,
                                                 "memory_layers": [5]},
           "memory": [{"type": "stm"}], "memory_system": {"read": ["knn_attention"], "key_layer": 6},
           "train": {"data": "demo", "tokens": 10**9, "batch": 64, "micro_batch": 16}}
    tiny = shrink_manifest(big)
    built = load_manifest_text(yaml.safe_dump(tiny)).manifest
    assert built.model.dim == 32 and built.model.memory_layers == [1] and built.memory_system.key_layer == 1
    assert built.train.tokens == TINY_STEPS * 4 * 32 and built.train.data.settings["documents"] == TINY_DOCUMENTS
    assert big["model"]["dim"] == 512  # the original is untouched
