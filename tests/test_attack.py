"""``trasce attack``: Ring-A-Bell's search, its files, and its prompts judged on the embedded model."""

import csv
import json
import re

import pytest
import torch
from click.testing import CliRunner

from trasce import attack, data
from trasce.attack import AttackOptions, AttackSettings
from trasce.cli import main
from trasce.data import PromptFileError
from trasce.runs import RunFolder, RunFolderError

WORDS = ["red", "star", "striped", "blue", "cross", "solid", "on", "a"]


def bag_of_words(texts):
    """A stand-in text encoder whose optimum is known: each text's word counts over ``WORDS``."""
    return torch.tensor([[text.split().count(w) for w in WORDS] for text in texts], dtype=torch.float32)


def decode_words(genomes):
    return [" ".join(WORDS[i] for i in row) for row in genomes.tolist()]


def test_search_finds_the_texts_nearest_the_target_and_never_a_banned_word():
    target = bag_of_words(["red star striped"])[0]
    settings = AttackSettings(length=3, population=40, generations=60)
    tokens = torch.arange(len(WORDS))
    text, distance = attack.search(bag_of_words, decode_words, tokens, "x", target, settings,
                                   torch.Generator().manual_seed(0))
    assert sorted(text.split()) == ["red", "star", "striped"] and distance == 0
    # "star" banned: the best three words miss "star" and add one word the target lacks, or a second
    # "red"/"striped": two unit differences over the eight counts.
    text, distance = attack.search(bag_of_words, decode_words, tokens, "x", target, settings,
                                   torch.Generator().manual_seed(0), attack.ban_pattern(["star"]))
    assert "star" not in text.split() and {"red", "striped"} <= set(text.split())
    assert distance == pytest.approx(2 / len(WORDS))


def test_the_same_row_searches_with_the_same_numbers_and_another_row_with_others():
    row = data.PromptRow(case="7", prompt="a red circle", seed=3, guidance_scale=1.5, row=2)
    again = data.PromptRow(case="7", prompt="a red circle", seed=3, guidance_scale=7.5, row=9)
    other = data.PromptRow(case="8", prompt="a red circle", seed=3, guidance_scale=1.5, row=3)
    draw = [torch.randint(1000, (4,), generator=attack.row_generator(r)).tolist() for r in (row, again, other)]
    assert draw[0] == draw[1] != draw[2]


def test_banned_words_are_whole_words_or_their_plurals_and_a_concepts_function_words_are_not_banned():
    words = attack.banned_words("the naked, nude, male genitalia", ["Blood"])
    assert words == ("blood", "genitalia", "male", "naked", "nude")
    pattern = attack.ban_pattern(words)
    texts = ("Nudes on a beach", "NUDE", "blood-red", "a bloody knife", "a female", "denude", "nudity", "a nud e")
    assert [bool(pattern.search(t)) for t in texts] == [True, True, True, False, False, False, False, False]
    assert attack.banned_words("a disc") == ("disc",)
    assert attack.banned_words("circle", ["disc"], concept_words=False) == ("disc",)
    with pytest.raises(ValueError, match="--ban takes a word, got '  '"):
        attack.banned_words("circle", ["  "])


def test_concept_vector_is_the_mean_difference_of_the_pairs():
    vector = attack.concept_vector(bag_of_words, [("a red star", "a red cross"), ("star star", "blue")])
    # (star - cross) and (2 star - blue), averaged: star 1.5, cross -0.5, blue -0.5.
    expected = torch.zeros(len(WORDS))
    expected[WORDS.index("star")], expected[WORDS.index("cross")], expected[WORDS.index("blue")] = 1.5, -0.5, -0.5
    assert torch.equal(vector, expected)


def test_the_vocabulary_leaves_out_special_tokens_and_banned_words():
    from trasce.pipeline import load_diffusers_pipeline

    tokenizer = load_diffusers_pipeline("toy").tokenizer
    names = set(tokenizer.convert_ids_to_tokens(attack.vocabulary(tokenizer, attack.ban_pattern(["circle"])).tolist()))
    assert "circle" not in names and not {"<pad>", "<bos>", "<eos>", "<unk>"} & names
    assert {"disc", "round", "red", ","} <= names and len(names) == len(tokenizer) - 5


def test_toy_pairs_swap_the_concepts_name_for_another_value():
    from trasce.toy.captions import mentioned

    pairs = attack.toy_pairs("circle", 12, seed=1)
    assert len(pairs) == 12
    for with_concept, without in pairs:
        assert mentioned(with_concept)["shape"] == "circle" and mentioned(without)["shape"] != "circle"
        assert with_concept.replace("circle", "") == without.replace(mentioned(without)["shape"], "")


@pytest.mark.parametrize("name, content, message", [
    ("pairs.csv", "with_concept,without\na,b\n",
     "pairs.csv: no column 'without_concept'; expected 'with_concept', 'without_concept' (found: 'with_concept', "
     "'without')"),
    ("pairs.csv", "with_concept,without_concept\na,b\nc, \n\n,d\n",
     "pairs.csv, row 3, column 'without_concept': empty; every row of a pairs file fills 'with_concept', "
     "'without_concept' (and 1 more problem in this file)"),
    ("pairs.csv", 'with_concept,without_concept\n"a, b\n', "pairs.csv, row 2: cannot be parsed"),
    ("pairs.csv", "with_concept,without_concept\n", "pairs.csv: no rows"),
    ("pairs.tsv", "with_concept\twithout_concept\n", "pairs.tsv: a pairs file is read as CSV; give a .csv file"),
])
def test_a_bad_pairs_file_is_named_with_its_row_and_column(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        attack.read_pairs(path)


SMALL = dict(n_prompts=3, n_pairs=20, population=24, generations=6, quiet=True)


def test_attack_writes_a_prompt_file_generate_reads_and_resumes_it(tmp_path):
    out = tmp_path / "attack"
    result = attack.run(AttackOptions(out=out, concept="circle", **SMALL))
    path = out / "prompts.csv"
    assert result["file"] == str(path) and json.loads((out / "run.json").read_text())["settings"]["banned"] == [
        "circle"]
    unbroken = path.read_bytes()
    rows = data.read_prompts(path)
    sources = attack.toy_rows("circle", 3, 42, 1.5)
    assert [(r.case, r.seed, r.guidance_scale) for r in rows] == [(r.case, r.seed, 1.5) for r in sources]
    assert [r.extra["source_prompt"] for r in rows] == [r.prompt for r in sources]
    assert all("circle" not in r.prompt for r in rows) and all("circle" in r.prompt for r in sources)
    # Each text found is nearer its target than the source prompt is.
    assert result["nearer"] == 3 and all(float(r.extra["distance"]) < float(r.extra["source_distance"]) for r in rows)

    # A run stopped after two prompts resumes with the third and keeps the two rows it holds: the
    # second's text, changed here, survives, and the rest is what the unbroken run wrote.
    lines = unbroken.decode().splitlines(keepends=True)
    path.write_text("".join(lines[:3]).replace(rows[1].prompt, "kept as written"))
    attack.run(AttackOptions(out=out, concept="circle", **SMALL))
    assert [r.prompt for r in data.read_prompts(path)] == [rows[0].prompt, "kept as written", rows[2].prompt]
    assert path.read_text().endswith(lines[3])

    # The default length, given by name, resumes; another is refused once the tokenizer tells them apart.
    attack.run(AttackOptions(out=out, concept="circle", **{**SMALL, "length": 14}))
    with pytest.raises(RunFolderError, match="holds a run with different settings: 'length' was 14, now 13"):
        attack.run(AttackOptions(out=out, concept="circle", **{**SMALL, "length": 13}))
    with pytest.raises(RunFolderError, match="holds a run with different settings: 'generations' was 6, now 7"):
        attack.run(AttackOptions(out=out, concept="circle", **{**SMALL, "generations": 7}))
    with pytest.raises(RunFolderError, match=re.escape("'banned' was [\"circle\"], now [\"circle\", \"disc\"]")):
        attack.run(AttackOptions(out=out, concept="circle", ban=("disc",), **SMALL))
    (out / "run.json").write_text("[]")
    with pytest.raises(RunFolderError, match="run.json has no 'settings' object"):
        attack.run(AttackOptions(out=out, concept="circle", **SMALL))
    (out / "run.json").unlink()
    with pytest.raises(RunFolderError, match="holds prompts.csv but no run.json"):
        attack.run(AttackOptions(out=out, concept="circle", **SMALL))


def test_an_overwrite_stopped_before_its_first_prompt_leaves_no_old_rows_to_resume(tmp_path, monkeypatch):
    out = tmp_path / "attack"
    attack.run(AttackOptions(out=out, concept="circle", **SMALL))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attack, "search", stopped)
    with pytest.raises(KeyboardInterrupt):
        attack.run(AttackOptions(out=out, concept="circle", overwrite=True, **{**SMALL, "generations": 7}))
    assert not (out / "prompts.csv").exists()
    monkeypatch.undo()
    searched = []
    monkeypatch.setattr(attack, "search", lambda *args, **kwargs: searched.append(args[3]) or ("a disc", 0.0))
    attack.run(AttackOptions(out=out, concept="circle", **{**SMALL, "generations": 7}))
    assert len(searched) == 3


def test_more_prompts_resume_the_searches_made_and_fewer_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "attack"
    attack.run(AttackOptions(out=out, concept="circle", **{**SMALL, "n_prompts": 2}))
    first = (out / "prompts.csv").read_text().splitlines()
    searched = []
    monkeypatch.setattr(attack, "search", lambda *args, **kwargs: searched.append(args[3]) or ("a disc", 0.0))
    attack.run(AttackOptions(out=out, concept="circle", **SMALL))  # three prompts: the third is new
    assert searched == [attack.toy_rows("circle", 3, 42, 1.5)[2].prompt]
    assert (out / "prompts.csv").read_text().splitlines()[:3] == first
    with pytest.raises(PromptFileError, match="case '00002': no such case among the prompts attacked; delete its row"):
        attack.run(AttackOptions(out=out, concept="circle", **{**SMALL, "n_prompts": 2}))


def test_overwrite_keeps_what_it_would_replace_until_every_check_passed_and_never_takes_a_generate_folder(tmp_path):
    out = tmp_path / "attack"
    attack.run(AttackOptions(out=out, concept="circle", **SMALL))
    kept = {name: (out / name).read_bytes() for name in ("prompts.csv", "run.json")}
    with pytest.raises(ValueError, match="--length 15: this model's tokenizer takes 1 to 14"):
        attack.run(AttackOptions(out=out, concept="circle", overwrite=True, **{**SMALL, "length": 15}))
    with pytest.raises(ValueError, match="--strength 1e\\+30: the distances to the target overflow"):
        attack.run(AttackOptions(out=out, concept="circle", overwrite=True, **{**SMALL, "strength": 1e30}))
    assert {name: (out / name).read_bytes() for name in kept} == kept
    (out / "run.json").write_text("{damaged")
    attack.run(AttackOptions(out=out, concept="circle", overwrite=True, **SMALL))
    assert (out / "prompts.csv").read_bytes() == kept["prompts.csv"]

    generated = RunFolder(tmp_path / "generated")
    generated.write_run_json({"model": "toy", "concept": "circle"})
    generated.manifest_path.write_text("")
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match="generated holds a trasce generate run, not an attack's prompts"):
            attack.run(AttackOptions(out=generated.path, concept="circle", overwrite=overwrite, **SMALL))
    assert generated.read_run_json()["settings"] == {"model": "toy", "concept": "circle"}


@pytest.mark.parametrize("edit, message", [
    (lambda text: text + "99999,foo bar,7,1.5,a red circle,0.1,0.6\n", "case '99999': no such case among the prompts"),
    (lambda text: text + text.splitlines(keepends=True)[1], "case '00000': appears twice"),
    (lambda text: text.replace(",42,1.5,", ",41,1.5,", 1), "case '00000', column 'evaluation_seed': '41', but the "
                                                           "prompt attacked has '42'"),
    (lambda text: re.sub(r",[0-9.]+(,[0-9.]+\n)", r",abc\1", text, count=1),
     "case '00000', column 'distance': 'abc' is not a number"),
])
def test_a_prompt_file_edited_by_hand_is_checked_before_it_is_resumed(tmp_path, edit, message):
    out = tmp_path / "attack"
    attack.run(AttackOptions(out=out, concept="circle", **SMALL))
    path = out / "prompts.csv"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=re.escape(message)):
        attack.run(AttackOptions(out=out, concept="circle", **SMALL))


def test_a_concept_named_by_an_alias_bans_its_value_on_the_embedded_model(tmp_path):
    result = attack.run(AttackOptions(out=tmp_path / "a", concept="a disc", **{**SMALL, "n_prompts": 1}))
    assert result["settings"]["banned"] == ["circle", "disc"]
    assert attack.ban_pattern(["circle", "disc"]).search(result["rows"][0]["prompt"]) is None


def test_attack_on_a_model_folder_reads_prompts_and_pairs(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
                       "c1,an apple on a table,7,6.5,fruit\nc2,\"two apples, red\",8,5.0,fruit\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("with_concept,without_concept\nan apple,a pear\nan apple tree,a tree\n")
    out = tmp_path / "apple"
    base = dict(out=out, model=str(tiny_sd_folder), concept="apple", length=6, population=12, generations=3,
                quiet=True)
    with pytest.raises(ValueError, match="give --prompts .* and --pairs"):
        attack.run(AttackOptions(**base, prompts=prompts))
    attack.run(AttackOptions(**base, prompts=prompts, pairs=pairs, ban=("pear",)))
    rows = data.read_prompts(out / "prompts.csv")
    assert [(r.case, r.seed, r.guidance_scale, r.extra["categories"]) for r in rows] == [
        ("c1", 7, 6.5, "fruit"), ("c2", 8, 5.0, "fruit")]
    assert all(attack.ban_pattern(["apple", "pear"]).search(r.prompt) is None for r in rows)


def test_the_command_line_attack_and_its_refusals(tmp_path):
    out = tmp_path / "a"
    args = ["attack", "--concept", "circle", "--n-prompts", "2", "--population", "16", "--generations", "3", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"2 prompts in {out / 'prompts.csv'} (banned: circle); " in result.output
    with open(out / "prompts.csv", newline="") as file:
        assert [r["case_number"] for r in csv.DictReader(file)] == ["00000", "00001"]
    for extra, message in ((["--length", "15"], "--length 15: this model's tokenizer takes 1 to 14"),
                           (["--population", "1"], "population must be at least 2, got 1"),
                           (["--strength", "nan"], "strength must be a finite number, got nan"),
                           (["--strength", "1e308"], "--strength 1e+308: the distances to the target overflow"),
                           (["--pairs", str(tmp_path / "none.csv")], "none.csv: file not found"),
                           (["--prompt-column", "adv_prompt"], "--prompt-column 'adv_prompt' names a column of "
                                                               "--prompts; give the file too")):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_attack_prompts_without_the_word_still_draw_the_concept_unprotected(tmp_path):
    """The point of the attack, judged: the texts found hold no "circle", and the embedded model
    draws circles for them."""
    from trasce import TraSCEPipeline
    from trasce.toy.judge import Judge

    out = tmp_path / "attack"
    attack.run(AttackOptions(out=out, concept="circle", n_prompts=6, population=60, generations=40, quiet=True))
    rows = data.read_prompts(out / "prompts.csv")
    pipe = TraSCEPipeline.from_pretrained("toy", mode="none")
    images = pipe([r.prompt for r in rows], generator=[torch.Generator().manual_seed(r.seed) for r in rows],
                  output_type="pt").images
    shapes = [verdict["shape"] for verdict in Judge.load().classify(images * 2 - 1)]
    assert shapes.count("circle") >= 5, shapes


def test_on_sdxl_the_distance_takes_both_encoders_and_the_pooled_embedding():
    from trasce.models import adapter_for
    from trasce.models.random import build

    pipe = build("tiny-sdxl")
    adapter = adapter_for(pipe)
    cond = adapter.encode(["a red apple", "a pear"])
    rows = attack.encoder(adapter)(["a red apple", "a pear"])
    assert torch.equal(rows, torch.cat([cond["encoder_hidden_states"].flatten(1), cond["text_embeds"]], dim=1))
    tokens = attack.vocabulary(pipe.tokenizer, attack.ban_pattern(["apple"]))

    def decode(genomes):
        return [t.strip() for t in pipe.tokenizer.batch_decode(genomes.tolist(), skip_special_tokens=True)]

    text, distance = attack.search(attack.encoder(adapter), decode, tokens, "a red apple", rows[0],
                                   AttackSettings(length=8, population=16, generations=4),
                                   torch.Generator().manual_seed(0), attack.ban_pattern(["apple"]))
    assert "apple" not in text and distance == pytest.approx(float(((attack.encoder(adapter)([text])[0] - rows[0])
                                                                     ** 2).mean()), rel=1e-5)
