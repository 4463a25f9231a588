"""README claims of the sections "The API in ten lines", "What runs where" and "Commands",
checked by running them: the code blocks, the commands' flags, and every relative link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nup import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_api_in_ten_lines_runs():
    first, wrapper = _python_blocks(_section("The API in ten lines"))
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    scope: dict = {"loader": loader}
    exec(first, scope)
    v = scope["v"]
    assert set(v) >= {"update_norm", "cos", "c_norm", "coherence", "lr", "skipped"}
    assert v["step"] == 3 and int(v["skipped"].sum()) == 0

    scope = {"torch": torch, "nup": scope["nup"]}
    exec(wrapper, scope)
    scales = scope["opt"].scales()
    assert scales["self_attn.in_proj_weight"] is not None and scales["norm1.weight"] is None


def test_links_resolve_and_the_docs_replace_spec_and_design():
    for link in re.findall(r"\]\(([^)#]+)", README):
        if not link.startswith("http"):
            assert (REPO / link).exists(), link
    assert (REPO / "docs" / "method.md").is_file() and (REPO / "docs" / "design.md").is_file()
    for title in ("The API in ten lines", "What runs where", "Commands", "Several processes"):
        assert "DESIGN.md" not in _section(title) and "SPEC" not in _section(title)


@pytest.mark.parametrize("command, flags", [
    ("train", ["--checkpoint-every", "--resume", "--tensorboard", "--nproc", "--out"]),
    ("sweep", ["--jobs", "--resume", "--checkpoint-every"]),
    ("report", ["--out"]),
    ("study", ["--quick", "--out"]),
    ("bench", ["--suite", "--quick", "--out"]),
])
def test_commands_have_the_flags_the_readme_names(command, flags, capsys):
    assert f"`nup {command}" in _section("Commands")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, (command, flag)
    if command in ("study", "bench"):
        assert "runs/" in text  # the default output folder the README names
