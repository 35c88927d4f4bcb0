"""The scoring endpoint's input: a chat prompt is rendered exactly as training renders it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.models import Prompt
from app.schemas import ScoreIn
from app.services import training_data

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!\nHow are you?"},
]


def test_chat_prompt_renders_as_the_trainer_renders_it() -> None:
    body = ScoreIn.model_validate({"prompt": MESSAGES, "completions": ["Fine."]})
    expected = training_data.prompt_text(Prompt(text=None, messages=MESSAGES))
    assert body.prompt_text() == expected == "system: Be brief.\nuser: Hi!\nHow are you?"
    assert ScoreIn(prompt="plain", completions=["a"]).prompt_text() == "plain"


@pytest.mark.parametrize(
    "prompt",
    [
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": "x", "name": "extra"}],
        [],
        "x" * 100_001,
    ],
)
def test_bad_prompts_are_refused(prompt: object) -> None:
    with pytest.raises(ValidationError):
        ScoreIn.model_validate({"prompt": prompt, "completions": ["a"]})
