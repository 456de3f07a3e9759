"""The README's library example runs verbatim."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_own_model_example_runs_verbatim(capsys):
    text = README.read_text()
    block = re.search(r"<!-- README example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    for part in ("'ce'", "'kd'", "'kd@va2'", "'hint'", "'hint@va2'"):
        assert part in out


def test_every_other_python_block_of_the_readme_runs_as_written():
    """The first block (the anchors, quantize) once named `teacher_logits` and `create_model` without defining or
    importing them: every block must run on its own (the example above is run, and checked, by its own test)."""
    text = re.sub(r"<!-- README example.*?-->\n```python\n.*?```", "", README.read_text(), flags=re.S)
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for i, block in enumerate(blocks):
        ns = {"__name__": f"readme_block_{i}"}
        exec(compile(block, f"README.md python block {i}", "exec"), ns)  # raises where a name is missing
