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
