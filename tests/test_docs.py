"""Docs check: every fenced code block in README.md and docs/*.md is run or checked, and the generated tables match.

Fences and what happens to them:

- ```python: the blocks of one page run in order in ONE fresh namespace (a page reads like a notebook: a block may
  use names defined earlier on the same page), in a temporary working directory, offline, against tiny models:
  * the Hugging Face Hub is a local cache in offline mode (`HF_HUB_OFFLINE`) that holds a tiny random CLIP (2+2
    layers, width 32, 32x32 images, the offline world's word-level tokenizer) under the id in `FAKE_HUB_MODELS`,
    so `CLIPModel.from_pretrained("openai/clip-vit-base-patch16")`, `AutoModel`, `AutoTokenizer`,
    `AutoImageProcessor`, `CLIPProcessor`, `snapshot_download`, `PeftModel.from_pretrained`, ... all work;
  * `HfApi.create_repo` / `upload_folder` / `upload_file` write into that cache, so a block can push to the Hub
    and load back what it pushed;
  * predefined names (`PRELUDE`): `pixels` / `pixel_values` (4 images for the tiny CLIP) and `input_ids` /
    `attention_mask` (4 tokenised captions).
- ```bash: every command is checked, not run: its arguments are parsed by the real parser of the program
  (`python script.py ...`, `python -m module ...`, `accelerate ...`, `torchrun ...`; launchers recurse into the
  script they launch), `pip install` extras must exist in pyproject.toml, `python -m pytest` is skipped (it is the
  suite itself), `export VAR=value` is accepted. Any other program fails the check.
- ```yaml and ```json are parsed (an Accelerate config file must load as one); ```text is not run (output, file
  layouts, error messages).
- A fence without a language, or with another language, fails the check.

Generated tables (between `<!-- begin generated: NAME -->` and `<!-- end generated: NAME -->`): the README's
supported-families table (from the census in tests/architecture_census.py, checked by tests/test_architectures.py),
the `LPIConfig` fields and `ContinualTrainingArguments` in docs/api.md, the example's flags in docs/cli.md. Regenerate them with
`python tests/test_docs.py --update`.

Also checked: docs/api.md names every public function, class and `LPIModel` method; links between pages (and their
#anchors) resolve; the injection figure and its script exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[^\s`]*)[^`]*$")
LANGUAGES = {"python", "bash", "yaml", "json", "text"}

FAKE_HUB_MODELS = ("openai/clip-vit-base-patch16",)  # ids the docs load; each holds the same tiny CLIP
FAKE_REVISION = "0" * 40

PRELUDE = """
import torch
from transformers import AutoImageProcessor, AutoTokenizer
_tok = AutoTokenizer.from_pretrained("openai/clip-vit-base-patch16")
_text = _tok(["a red circle", "a blue square on the left", "a noisy green ring", "a large digit one"],
             padding=True, return_tensors="pt")
input_ids, attention_mask = _text["input_ids"], _text["attention_mask"]
pixels = pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# A task's training data for its k-means keys: at least num_keys (5) samples, or k-means has fewer points than keys.
_task = _tok([f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "ring", "digit")],
             padding=True, return_tensors="pt")
task_input_ids, task_attention_mask = _task["input_ids"], _task["attention_mask"]
task_pixels = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
del _tok, _text, _task
"""


# ----------------------------------------------------------------------------------------------------------- blocks
@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def read_blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a markdown page (indented fences inside lists included, dedented)."""
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not _closes(lines[i], fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(REPO)}:{start + 1}: unclosed code fence")
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_every_block_has_a_known_language():
    bad = [f"{b.where}: ```{b.lang or '(none)'}" for b in ALL_BLOCKS if b.lang not in LANGUAGES]
    assert not bad, f"Use one of {sorted(LANGUAGES)} as the fence language (text for anything not runnable): {bad}"


# ---------------------------------------------------------------------------------------------- the offline hub
def _repo_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face cache (created, with refs/main pointing at it)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_REVISION)
    snapshot = repo / "snapshots" / FAKE_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hub cache holding a tiny random CLIP, its tokenizer and image processor under every FAKE_HUB_MODELS id."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from peft_lpi.data.backbone import build_world_tokenizer, world_image_processor

    cache = tmp_path_factory.mktemp("hub")
    tokenizer = build_world_tokenizer()
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # like CLIP's tokenizer: no token_type_ids
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    for repo_id in FAKE_HUB_MODELS:
        snapshot = _repo_snapshot(cache, repo_id)
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        world_image_processor([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).save_pretrained(snapshot)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch, tmp_path):
    """Offline mode on `hub_cache`, uploads written into it, a fresh working directory and Accelerate state."""
    import huggingface_hub
    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFT_LPI_CACHE", str(tmp_path / "peft_lpi_cache"))

    def create_repo(self, repo_id, **kwargs):
        _repo_snapshot(hub_cache, repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, _repo_snapshot(hub_cache, repo_id), dirs_exist_ok=True)

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        target = _repo_snapshot(hub_cache, repo_id) / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path_or_fileobj, target)

    for name, fake in (("create_repo", create_repo), ("upload_folder", upload_folder), ("upload_file", upload_file)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fake)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and much more on a busy machine
    yield work
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)


# ------------------------------------------------------------------------------------------------ python blocks
PYTHON_PAGES = [page for page in PAGES if any(b.page == page and b.lang == "python" for b in ALL_BLOCKS)]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run(page, offline_hub):
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(PRELUDE, "<docs prelude>", "exec"), namespace)
    for block in (b for b in ALL_BLOCKS if b.page == page and b.lang == "python"):
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except BaseException as err:
            raise AssertionError(f"python block at {block.where} failed: {type(err).__name__}: {err}") from err


# -------------------------------------------------------------------------------------------------- bash blocks
class _Parsed(Exception):
    """Raised instead of returning from the outermost argument parsing of a checked command."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, extras: list[str]):
        super().__init__(parser.prog)
        self.parser, self.namespace, self.extras = parser, namespace, extras


@contextlib.contextmanager
def _stop_after_parsing(argv: list[str]):
    """Make the outermost `ArgumentParser.parse_known_args` (argparse, HfArgumentParser, accelerate, torchrun) raise
    `_Parsed` with its result, with `sys.argv = argv`; nested calls (subcommands) run normally."""
    original = argparse.ArgumentParser.parse_known_args
    depth = 0

    def parse_known_args(self, args=None, namespace=None):
        nonlocal depth
        depth += 1
        try:
            result = original(self, args, namespace)
        finally:
            depth -= 1
        if depth == 0:
            raise _Parsed(self, *result)
        return result

    saved_argv = sys.argv
    argparse.ArgumentParser.parse_known_args = parse_known_args
    sys.argv = list(argv)
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv


def parse_command_line(entry_point, argv: list[str]) -> _Parsed:
    """Run `entry_point()` with `sys.argv = argv` up to its argument parsing; the parse result (or an error)."""
    with _stop_after_parsing(argv), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            entry_point()
        except _Parsed as parsed:
            if parsed.extras:
                raise AssertionError(f"unrecognised arguments {parsed.extras} for {parsed.parser.prog}") from None
            return parsed
        except SystemExit as exit_:
            raise AssertionError(f"{' '.join(argv)}: argument parsing failed (exit {exit_.code})") from None
    raise AssertionError(f"{' '.join(argv)} finished without parsing arguments: it cannot be checked")


def _script_entry(script: str):
    path = REPO / script
    if not path.is_file():
        raise AssertionError(f"no such script: {script}")
    source = path.read_text(encoding="utf-8")
    if "ArgumentParser" not in source:  # refuse to run a script that would not stop at argument parsing
        raise AssertionError(f"{script} has no argument parser: this check cannot run it safely")

    def run() -> None:  # as `python script.py` does, the script's folder is importable (sibling modules)
        sys.path.insert(0, str(path.parent))
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.path.remove(str(path.parent))

    return run


def _check_pip(args: list[str]) -> str:
    import tomllib

    assert args and args[0] == "install", f"only `pip install` is checked, got pip {' '.join(args)}"
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for arg in args[1:]:
        match = re.fullmatch(r"\.\[([\w,\s-]+)\]", arg)
        if match:
            missing = {e.strip() for e in match[1].split(",")} - extras
            assert not missing, f"pip install: extras {sorted(missing)} are not in pyproject.toml ({sorted(extras)})"
    return "pip install: extras exist"


def check_command(argv: list[str]) -> str:
    """Check one command line (environment assignments stripped); returns what was checked."""
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    program, args = argv[0], argv[1:]
    if program == "export":
        assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", a) for a in args), f"export {args}"
        return "export"
    if program == "pip":
        return _check_pip(args)
    if program in ("python", "python3"):
        if args[:2] == ["-m", "pytest"]:
            return "skipped: the test suite itself"
        if args[:1] == ["-m"]:
            module = args[1]
            parsed = parse_command_line(
                lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), [module, *args[2:]]
            )
        else:
            parsed = parse_command_line(_script_entry(args[0]), args)
    elif program == "accelerate":
        from accelerate.commands.accelerate_cli import main as accelerate_main

        parsed = parse_command_line(accelerate_main, argv)
    elif program == "torchrun":
        from torch.distributed.run import main as torchrun_main

        parsed = parse_command_line(torchrun_main, argv)
    elif program == "make":
        return "make + " + "; ".join(_check_make(args))
    else:
        raise AssertionError(f"no check for the program {program!r}: use a ```text fence, or teach tests/test_docs.py")
    script = getattr(parsed.namespace, "training_script", None)
    if script is not None:  # a launcher: check the launched script's own arguments too
        return f"{program} + " + check_command(["python", script, *parsed.namespace.training_script_args])
    return f"{program}: arguments parse"


def _check_make(args: list[str]) -> list[str]:
    """`make TARGET [VAR=value]`: the target's recipe (`make -n`, the install step assumed done) is checked line by
    line, each program of the virtual environment as the program itself."""
    stamp = re.search(r"^STAMP := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).replace("$(VENV)", ".venv")
    result = subprocess.run(["make", "-n", "--no-print-directory", "-o", stamp, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"make -n {shlex.join(args)}: {result.stderr.strip()}"
    checked = []
    for line in result.stdout.splitlines():
        argv = shlex.split(line)
        argv[0] = Path(argv[0]).name  # .venv/bin/accelerate -> accelerate
        checked.append(check_command(argv))
    assert checked, f"make {shlex.join(args)} runs nothing"
    return checked


def split_commands(code: str) -> list[list[str]]:
    """Command lines of a bash block: continuation lines joined, comments dropped, split at ; && || |."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


BASH_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "bash"]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.where)
def test_bash_commands_are_valid(block, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = split_commands(block.code)
    assert commands, f"{block.where}: empty bash block"
    for argv in commands:
        try:
            check_command(argv)
        except AssertionError as err:
            raise AssertionError(f"{block.where}: `{shlex.join(argv)}`: {err}") from None


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in ("yaml", "json")], ids=lambda b: b.where)
def test_yaml_and_json_blocks_parse(block, tmp_path):
    if block.lang == "json":
        json.loads(block.code)
        return
    import yaml

    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and "distributed_type" in data:  # an Accelerate config file: Accelerate must load it
        from accelerate.commands.config.config_args import ClusterConfig

        path = tmp_path / "accelerate_config.yaml"
        path.write_text(block.code)
        ClusterConfig.from_yaml_file(str(path))


# --------------------------------------------------------------------------------------------- generated tables
def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    return f"`{value!r}`"


def _annotation(cls, name: str) -> str:
    """A field's annotation as written in the source (`Field.type` is not reliable: HfArgumentParser rewrites it)."""
    for klass in cls.__mro__:
        annotation = inspect.get_annotations(klass).get(name)
        if annotation is not None:
            return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    raise AssertionError(f"{cls.__name__}.{name} has no annotation")


def dataclass_table(cls, inherited_from: type | None = None) -> str:
    """A markdown table of a dataclass's fields (without those of `inherited_from`): name, type, default, help."""
    skip = {f.name for f in dataclasses.fields(inherited_from)} if inherited_from is not None else set()
    rows = ["| field | type | default | help |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = _annotation(cls, f.name)
        rows.append(f"| `{f.name}` | `{_cell(kind)}` | {_default(default)} | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(rows)


def lpi_config_table() -> str:
    from peft import PeftConfig

    from peft_lpi import LPIConfig

    return dataclass_table(LPIConfig, inherited_from=PeftConfig)


def trainer_arguments_table() -> str:
    from peft_lpi.continual.trainer import ContinualTrainingArguments

    return dataclass_table(ContinualTrainingArguments)


def cli_flags_table() -> str:
    """The flags of examples/continual_retrieval.py as its own parser defines them (offline defaults included)."""
    parser = parse_command_line(_script_entry("examples/continual_retrieval.py"),
                                ["examples/continual_retrieval.py"]).parser
    rows = ["| flag | default | help |", "|---|---|---|"]
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        flag = action.option_strings[0]
        if action.nargs == "?" and action.const is True:
            flag += " [true/false]"
        elif action.nargs == 0:
            rows.append(f"| `{flag}` | | sets `{action.dest}` to `{action.const}` |")
            continue
        elif action.nargs == "+":
            flag += " V [V ...]"
        rows.append(f"| `{flag}` | {_default(action.default)} | {_cell(action.help or '')} |")
    return "\n".join(rows)


def supported_families_table() -> str:
    from architecture_census import census_table

    return census_table()


GENERATED = {
    "README.md": {"supported-families": supported_families_table},
    "docs/api.md": {"lpi-config": lpi_config_table, "trainer-arguments": trainer_arguments_table},
    "docs/cli.md": {"cli-flags": cli_flags_table},
}


def _generated_span(text: str, name: str) -> re.Match:
    pattern = re.compile(rf"(<!-- begin generated: {name} -->\n)(.*?)(<!-- end generated: {name} -->)", re.S)
    match = pattern.search(text)
    if match is None:
        raise AssertionError(f"markers of the generated table {name!r} not found")
    return match


def update_generated_tables() -> None:
    for page, tables in GENERATED.items():
        path = REPO / page
        text = path.read_text(encoding="utf-8")
        for name, make in tables.items():
            match = _generated_span(text, name)
            text = text[: match.start(2)] + make() + "\n" + text[match.end(2):]
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("page,name", [(p, n) for p, tables in GENERATED.items() for n in tables])
def test_generated_tables_match_the_code(page, name):
    text = (REPO / page).read_text(encoding="utf-8")
    assert _generated_span(text, name)[2] == GENERATED[page][name]() + "\n", (
        f"{page}: the generated table {name!r} is out of date; run `python tests/test_docs.py --update`"
    )


API_MODULES = (
    "peft_lpi",
    "peft_lpi.tuner.registration",
    "peft_lpi.tuner.config",
    "peft_lpi.tuner.model",
    "peft_lpi.tuner.factors",
    "peft_lpi.tuner.layer",
    "peft_lpi.tuner.architectures",
    "peft_lpi.tuner.routing",
    "peft_lpi.tuner.trainability",
    "peft_lpi.tuner.task_routing",
    "peft_lpi.tuner.task_files",
    "peft_lpi.tuner.shallow",
    "peft_lpi.tuner.additive",
    "peft_lpi.continual.objective",
    "peft_lpi.continual.losses",
    "peft_lpi.continual.similarity",
    "peft_lpi.continual.trainer",
    "peft_lpi.continual.methods",
    "peft_lpi.continual.evaluator",
    "peft_lpi.continual.checkpointing",
    "peft_lpi.continual.baselines",
    "peft_lpi.continual.baselines.grounding",
    "peft_lpi.continual.grounding_batches",
    "peft_lpi.evaluation",
    "peft_lpi.evaluation.retrieval",
    "peft_lpi.evaluation.grounding",
    "peft_lpi.continual.grounding_loss",
    "peft_lpi.data.grounding",
    "peft_lpi.data.refcoco",
    "peft_lpi.data.grounding_world",
    "peft_lpi.data.grounding_backbone",
    "peft_lpi.data.coco",
    "peft_lpi.data.generic",
    "peft_lpi.data.preprocess",
    "peft_lpi.data.world",
    "peft_lpi.data.backbone",
    "peft_lpi.report",
    "peft_lpi.io",
    "peft_lpi.hub",
)


def test_api_reference_is_complete():
    """Every public name of the package (a module's `__all__`, else its public functions and classes) and every
    public method of LPIModel appears in docs/api.md."""
    import importlib

    from peft_lpi import LPIModel

    api = (REPO / "docs/api.md").read_text(encoding="utf-8")
    missing = []
    for name in API_MODULES:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None) or [
            n for n, obj in vars(module).items()
            if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name
        ]
        missing += [f"{name}.{n}" for n in public if not re.search(rf"`[^`]*\b{re.escape(n)}\b", api)]
    methods = [n for n, obj in vars(LPIModel).items() if not n.startswith("_") and callable(getattr(LPIModel, n))]
    methods += [n for n, obj in vars(LPIModel).items() if isinstance(obj, property) and not n.startswith("_")]
    missing += [f"LPIModel.{n}" for n in methods if not re.search(rf"`[^`]*\b{n}\b", api)]
    assert not missing, f"not documented in docs/api.md: {missing}"


def test_figure_script_and_image_exist():
    assert (REPO / "docs/figures/make_injection_figure.py").is_file()
    png = (REPO / "docs/figures/injection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figures/injection.png" in (REPO / "docs/method.md").read_text(encoding="utf-8")


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a page (lower-case, punctuation dropped, spaces to hyphens)."""
    anchors: set[str] = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"#{1,6} +(.*?) *#*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_relative_links_resolve():
    """Links between pages (and to files of the repository) point at something that exists, anchors included."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                if path.name not in OWNED_BY_OTHERS:
                    broken.append(f"{page_id(page)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in github_anchors(path):
                broken.append(f"{page_id(page)} -> {target} (no such heading)")
    assert not broken, broken


OWNED_BY_OTHERS = {"results.md", "benchmarks.md", "offline_world.md", "robustness.md"}  # may land later


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Docs check helpers (the check itself: python -m pytest tests/test_docs.py).")
    cli.add_argument("--update", action="store_true", help="rewrite the generated tables in docs/api.md and docs/cli.md")
    if cli.parse_args().update:
        update_generated_tables()
