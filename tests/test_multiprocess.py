"""``accelerate launch -m trasce generate`` with two CPU processes shares one output folder."""

import collections
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_generate_every_prompt_exactly_once(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "p.csv"
    rows = "".join(f"{i},prompt {i},{i}\n" for i in range(7))
    prompts.write_text("case_number,prompt,evaluation_seed\n" + rows)
    out = tmp_path / "out"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # accelerate's multi-process launcher is called --multi_gpu; trasce asks it for CPU processes.
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "trasce", "generate", "--model", str(tiny_sd_folder),
               "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--concept", "x", "--quiet",
               "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    counts = collections.Counter(r["case"] for r in records)
    assert counts == {str(i): 1 for i in range(7)}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in range(7))
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["num_processes"] == 2
    # the evaluate step splits the images across the processes too, and judges each exactly once
    evaluate = [launcher, *command[1:command.index("generate")], "evaluate", str(out), "--judge", "toy", "--quiet"]
    judged = subprocess.run(evaluate, capture_output=True, text=True, env=env, timeout=600)
    assert judged.returncode == 0, judged.stderr[-3000:]
    verdict_lines = [json.loads(line) for line in (out / "verdicts-toy.jsonl").read_text().splitlines()]
    assert sum(1 for v in verdict_lines if v.get("header")) == 1
    assert collections.Counter(v["case"] for v in verdict_lines if not v.get("header")) == counts
    summary = json.loads((out / "summary-toy.json").read_text())
    assert summary["images"] == 7 and summary["judged_now"] == 7  # by both processes
    assert (summary["expected_images"], summary["complete"]) == (7, True)  # both shares, recorded once
    # a rerun across the same two processes has nothing left to do
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 7
    # a rerun with other settings is refused by both processes with the main process's message, not by the
    # second one dying at a barrier
    other = subprocess.run([*command[:command.index("--steps") + 1], "3", *command[command.index("--steps") + 2:]],
                           capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode != 0
    refusal = f"error: {out} holds a run with different settings: 'steps' was 2, now 3"
    assert other.stderr.count(refusal) == 2 and "Connection closed" not in other.stderr, other.stderr[-3000:]
