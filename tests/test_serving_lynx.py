"""Admission of LYNX requests to a vLLM server (steer.serving.vllm_lynx): what a client may send in
vllm_xargs, checked without vLLM (the server runs these checks and answers 400 with the message)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from steer.serving.vllm_lynx import LynxLogitsProcessor, request_options


def test_requests_that_do_not_opt_in_have_no_options():
    assert request_options(None) is None
    assert request_options({}) is None
    assert request_options({"steer_fingerprint": "k"}) is None
    assert request_options({"steer_lynx": False}) is None
    assert request_options({"steer_lynx": 0}) is None  # what false becomes through vLLM's vllm_xargs typing


def test_options_and_defaults():
    assert request_options({"steer_lynx": True}) == {
        "steer_lynx_budget": None, "steer_lynx_answer_tokens": 64, "steer_lynx_answer_stop": ()}
    got = request_options({"steer_lynx": 1, "steer_lynx_budget": 64, "steer_lynx_answer_tokens": 8,
                           "steer_lynx_answer_stop": [".", "\n"]})
    assert got == {"steer_lynx_budget": 64, "steer_lynx_answer_tokens": 8, "steer_lynx_answer_stop": (".", "\n")}
    assert request_options({"steer_lynx": True, "steer_lynx_answer_stop": "."})["steer_lynx_answer_stop"] == (".",)


@pytest.mark.parametrize("xargs, message", [
    ({"steer_lynx": "yes"}, "vllm_xargs.steer_lynx: 'yes' is not true"),
    ({"steer_lynx": 2}, "vllm_xargs.steer_lynx: 2 is not true"),
    ({"steer_lynx": True, "steer_lynx_budget": 0}, "vllm_xargs.steer_lynx_budget: 0 is not"),
    ({"steer_lynx": True, "steer_lynx_budget": "64"}, "vllm_xargs.steer_lynx_budget: '64' is not"),
    ({"steer_lynx": True, "steer_lynx_budget": True}, "vllm_xargs.steer_lynx_budget: True is not"),
    ({"steer_lynx": True, "steer_lynx_answer_tokens": 1.5}, "vllm_xargs.steer_lynx_answer_tokens"),
    ({"steer_lynx": True, "steer_lynx_answer_stop": [1]}, "vllm_xargs.steer_lynx_answer_stop"),
    ({"steer_lynx": True, "steer_lynx_answer_stop": [""]}, "vllm_xargs.steer_lynx_answer_stop"),
    ({"steer_lynx": True, "steer_lynx_answer_stop": ["x"] * 17}, "vllm_xargs.steer_lynx_answer_stop"),
    ({"steer_lynx": True, "steer_lynx_exit": 1}, "vllm_xargs.steer_lynx_exit: unknown LYNX option"),
    ({"steer_lynx_budget": 8}, "needs vllm_xargs.steer_lynx = true"),
])
def test_bad_options_name_the_key(xargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("'", ".")):
        request_options(xargs)


@pytest.mark.parametrize("field, value", [("ignore_eos", True), ("min_tokens", 3), ("prompt_logprobs", 1)])
def test_sampling_settings_that_fight_the_forced_exit_are_refused(field, value):
    params = SimpleNamespace(extra_args={"steer_lynx": True}, ignore_eos=False, min_tokens=0, prompt_logprobs=None)
    LynxLogitsProcessor.validate_params(params)  # admitted as is
    setattr(params, field, value)
    with pytest.raises(ValueError, match=f"vllm_xargs.steer_lynx with {field}"):
        LynxLogitsProcessor.validate_params(params)
    params.extra_args = {}
    LynxLogitsProcessor.validate_params(params)  # not opted in: not LYNX's business
