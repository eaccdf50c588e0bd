"""Prompt files: every format, every problem reported at once with its line, field and rule."""

from __future__ import annotations

from pathlib import Path

import pytest

import kling_async as ka
from kling_async.cli._naming import clip_name, slug
from kling_async.cli._prompts import Defaults, PromptFile, PromptFileError, load_prompts


def load(
    path: Path,
    text: str,
    defaults: Defaults | None = None,
    profile: ka.BackendProfile = ka.COMETAPI,
) -> PromptFile:
    path.write_text(text, encoding="utf-8")
    return load_prompts(path, defaults or Defaults(), profile)


def problems(path: Path, text: str, profile: ka.BackendProfile = ka.COMETAPI) -> str:
    with pytest.raises(PromptFileError) as caught:
        load(path, text, profile=profile)
    return caught.value.describe()


def test_txt_one_prompt_a_line_skipping_blanks_and_comments(tmp_path: Path) -> None:
    prompts = load(tmp_path / "p.txt", "\ufeff# a comment\nfirst prompt\n\n  second  \n")
    assert [(row.number, row.line, row.request.prompt) for row in prompts.rows] == [
        (1, 2, "first prompt"),
        (2, 4, "second"),
    ]
    assert [row.key for row in prompts.rows] == [f"{row.request_hash}#1" for row in prompts.rows]


def test_rows_are_keyed_by_content_and_occurrence_not_position(tmp_path: Path) -> None:
    first = load(tmp_path / "a.txt", "same\nother\nsame\n").rows
    moved = load(tmp_path / "b.txt", "new on top\n\nsame\nother\nsame\n").rows
    assert first[0].key != first[2].key  # the second identical prompt is its own row
    assert [row.occurrence for row in first] == [1, 1, 2]
    assert [row.key for row in moved[1:]] == [row.key for row in first]
    assert [(row.number, row.line) for row in moved[1:]] == [(2, 3), (3, 4), (4, 5)]


def test_defaults_fill_what_a_row_leaves_unset(tmp_path: Path) -> None:
    defaults = Defaults(model_name="kling-v2-6", mode="pro", duration="10", aspect_ratio="9:16")
    text = '{"prompt": "a"}\n{"prompt": "b", "mode": "std", "duration": 5}\n'
    rows = load(tmp_path / "p.jsonl", text, defaults).rows
    assert rows[0].request.mode == "pro"
    assert rows[0].request.duration == "10"
    assert rows[0].request.model_name == "kling-v2-6"
    assert (rows[1].request.mode, rows[1].request.duration) == ("std", "5")


def test_jsonl_takes_any_request_field_and_extra(tmp_path: Path) -> None:
    text = (
        '{"prompt": "p", "negative_prompt": "blur", "cfg_scale": 0.3, '
        '"camera_control": {"type": "simple", "config": {"zoom": 5}}, '
        '"external_task_id": "mine-1", "extra": {"sound": "on"}}\n'
    )
    [row] = load(tmp_path / "p.jsonl", text).rows
    assert row.request.camera_control is not None
    assert row.request.extra == {"sound": "on"}
    assert row.key == "id:mine-1"
    assert '"sound":"on"' in row.request_json


def test_csv_cells_become_typed_fields_and_quoted_cells_stay_on_their_line(
    tmp_path: Path,
) -> None:
    text = (
        "prompt,cfg_scale,camera_control,duration\n"
        '"a fox, ""quoted""",0.25,"{""type"": ""down_back""}",10\n'
        "plain,,,\n"
    )
    rows = load(tmp_path / "p.csv", text).rows
    assert [(row.line, row.request.prompt) for row in rows] == [
        (2, 'a fox, "quoted"'),
        (3, "plain"),
    ]
    assert rows[0].request.cfg_scale == 0.25
    assert rows[0].request.duration == "10"
    assert rows[1].request.cfg_scale is None
    report = problems(tmp_path / "q.csv", 'prompt,mode\n"two\nlines",std\nfine,std\n')
    assert "q.csv:2: a quoted cell runs on to line 3 (a stray quote?)" in report


def test_every_problem_is_reported_with_line_field_value_and_rule(tmp_path: Path) -> None:
    text = (
        '{"prompt": "ok"}\n'
        '{"prompt": ""}\n'
        '{"prompt": "p", "aspect_ratio": "21:9"}\n'
        '{"prompt": "p", "camera_control": {"type": "simple", "config": {"zoom": 5, "pan": 1}}}\n'
        '{"prompt": "p", "external_task_id": "x"}\n'
        '{"prompt": "p", "external_task_id": "x"}\n'
        '{"negative_prompt": "no prompt"}\n'
    )
    report = problems(tmp_path / "p.jsonl", text)
    assert "p.jsonl:2: prompt='' is invalid: must not be empty" in report
    assert "p.jsonl:3: aspect_ratio='21:9' is invalid: cometapi accepts" in report
    assert "p.jsonl:4: camera_control.config=" in report
    assert "exactly one of" in report
    assert "p.jsonl:6: external_task_id='x' is invalid: already used on line 5" in report
    assert "p.jsonl:7: prompt=None is invalid: is required" in report
    assert report.index(":2:") < report.index(":3:") < report.index(":7:")


def test_limits_follow_the_backend_profile(tmp_path: Path) -> None:
    text = "x" * 600 + "\n"
    assert "at most 500" in problems(tmp_path / "p.txt", text, ka.COMETAPI)
    assert len(load(tmp_path / "q.txt", text, profile=ka.OFFICIAL).rows) == 1


def test_unknown_models_are_a_warning_not_an_error(tmp_path: Path) -> None:
    prompts = load(tmp_path / "p.txt", "a\nb\n", Defaults(model_name="kling-v9"))
    assert len(prompts.rows) == 2
    assert len(prompts.warnings) == 1
    assert "kling-v9" in prompts.warnings[0]


def test_non_utf8_files_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    with pytest.raises(PromptFileError) as caught:
        load_prompts(path, Defaults(), ka.COMETAPI)
    assert "p.txt:3: not UTF-8" in caught.value.describe()


def test_many_problems_are_cut_short(tmp_path: Path) -> None:
    report = problems(tmp_path / "p.jsonl", "[]\n" * 40)
    assert "... and 10 more problems" in report


def test_request_hash_changes_with_what_is_sent_only(tmp_path: Path) -> None:
    one = load(tmp_path / "a.txt", "a fox\n").rows[0]
    same = load(tmp_path / "b.txt", "\n\na fox   \n").rows[0]
    other = load(tmp_path / "c.txt", "a fox\n", Defaults(mode="pro")).rows[0]
    assert one.request_hash == same.request_hash
    assert one.request_hash != other.request_hash


def test_clip_names_are_ours_sortable_and_safe() -> None:
    assert slug("Ünïcödé ../../etc/passwd; rm -rf /") == "unicode-etc-passwd-rm-rf"
    assert slug("日本語だけ") == "clip"
    assert slug("a" * 80) == "a" * 40
    assert clip_name(7, "A red fox!", 12) == "007-a-red-fox.mp4"
    assert clip_name(7, "x", 12000) == "00007-x.mp4"


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl", "prompts.csv"])
def test_the_shipped_examples_are_valid(name: str) -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / name
    prompts = load_prompts(path, Defaults(), ka.COMETAPI)
    assert len(prompts.rows) >= 3
    assert prompts.warnings == ()
