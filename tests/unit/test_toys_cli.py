"""``mechscope toy ...`` on the command line: bad options are refused before any training, and a saved toy
result re-renders to the same page without training."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.report.toys import render_toy_html
from mechscope.toys.common import figure, finish

runner = CliRunner()


def _result():
    return finish({"toy": "demo", "title": "Demo <b>toy</b>", "paper": {"cite": "A & B 2022", "url": ""}, "seed": 3,
                   "settings": {"n": 2}, "metrics": {"x": 1.5},
                   "comparisons": [{"quantity": "x", "paper": 1.0, "ours": 1.5, "note": "</script>"}],
                   "figures": [figure("f", "F", [{"type": "bar", "x": [1], "y": [2]}])], "notes": ["n"],
                   "command": "mechscope toy demo"}, 0.0)


def test_render_rebuilds_the_page_from_saved_json(tmp_path):
    r = _result()
    (tmp_path / "demo.json").write_text(json.dumps(r))
    res = runner.invoke(app, ["toy", "render", str(tmp_path / "demo.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "o" / "demo.html").read_text()
    assert page == render_toy_html(r)
    assert "Demo &lt;b&gt;toy&lt;/b&gt;" in page and "A &amp; B 2022" in page  # escaped
    assert page.count("</script>") == page.count("<script")  # the note's </script> cannot close a script


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    for args, msg in ((["toy", "render", str(tmp_path / "x.json")], "is not a toy result"),
                      (["toy", "render", str(tmp_path / "nope.json")], "cannot read"),
                      (["toy", "modular", "--p", "12", "--out", str(tmp_path / "m")], "prime"),
                      (["toy", "superposition", "--steps", "0", "--out", str(tmp_path / "s")], "steps"),
                      (["toy", "induction", "--steps", "0", "--out", str(tmp_path / "i")], "steps"),
                      (["toy", "induction", "--device", "tpu", "--out", str(tmp_path / "i")], "not a torch device")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
    assert not any((tmp_path / d).exists() for d in ("m", "s", "i"))
