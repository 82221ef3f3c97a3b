"""The output folder is never destroyed unless it is a finished run of ours (src/run_folder.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

import run_folder
from conftest import run_until_signal
from run_folder import COMPLETION_MARKER, OutputFolderError, RunFolder, is_finished_run


def _finished_run(folder, content="old"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("mode: unlearn\n")
    (folder / "weights.txt").write_text(content)
    (folder / COMPLETION_MARKER).write_text("{}")
    return folder


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_a_folder_that_is_not_a_finished_run_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputFolderError, match=rf"paths.output_dir={out} exists and is a folder that is not a "
                                                r"finished run.*never replaced"):
        RunFolder(out).start()
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "config.yaml").write_text("a run of ours without its completion marker (interrupted or older)")
    with pytest.raises(OutputFolderError, match="not a finished run"):
        RunFolder(out).start()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(OutputFolderError, match="exists and is a file"):
        RunFolder(a_file).start()
    assert a_file.read_text() == "keep me" and _leftovers(out) == []
    shutil.rmtree(out)
    RunFolder(out).start()  # the lock was released by the failed attempts


def test_the_output_may_not_hold_what_the_run_reads(tmp_path):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    with pytest.raises(OutputFolderError, match=r"is or contains .*/out/data, which this run reads"):
        RunFolder(tmp_path / "out", inputs=[str(data)]).start()
    with pytest.raises(OutputFolderError, match="which this run reads"):
        RunFolder(data, inputs=[str(data)]).start()
    RunFolder(tmp_path / "elsewhere", inputs=[str(data), "HuggingFaceTB/SmolLM2-135M-Instruct"]).start()


def test_run_inputs_list_every_data_folder_and_lm_eval_file():
    """The data folders of the run's datasets and of its benchmarks (their ``data_folder_key``), and what each
    benchmark reads besides (lm-eval's task folders and local data files)."""
    from hydra import compose, initialize_config_dir

    import train
    from conftest import REPO
    from evals import get_evaluators
    from resolvers import compose_names

    def inputs(overrides):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            cfg = compose_names(compose("unlearn.yaml", overrides=overrides))
        return set(train.run_inputs(cfg, get_evaluators(cfg.get("eval"), paths=cfg.paths)))

    assert inputs(["eval=lm_eval", "paths.tofu=/d/tofu", "eval.lm_eval.include_path=[/d/tasks]",
                   "+eval.lm_eval.task_overrides.wmdp_bio={dataset_path: json, dataset_kwargs: {data_files: "
                   "{test: /d/bio.jsonl}}}"]) >= {"/d/tofu", "/d/tasks", "/d/bio.jsonl"}
    assert inputs(["eval=muse", "data.forget=MUSE_forget", "data.retain=MUSE_retain", "data.eval=null",
                   "paths.muse_news=/d/muse"]) >= {"/d/muse"}
    assert inputs(["trainer=RMU", "data.forget=WMDP_forget_bio", "data.retain=WMDP_retain_wikitext",
                   "data.eval=null", "paths.wmdp=/d/wmdp"]) >= {"/d/wmdp"}


def test_a_second_run_to_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    first = RunFolder(out)
    staging, _ = first.start()
    with pytest.raises(OutputFolderError, match=rf"another run is writing paths.output_dir={out} \(pid {os.getpid()}"):
        RunFolder(out).start()
    assert staging.is_dir()  # the live run's folder is untouched
    (staging / "config.yaml").write_text("x")
    first.finish()
    assert is_finished_run(out) and _leftovers(out) == []
    second = RunFolder(out)
    second.start()
    second.abandon()


@pytest.mark.parametrize("exchange", [True, False])
def test_finishing_replaces_a_finished_run_in_one_step(tmp_path, monkeypatch, exchange):
    out = _finished_run(tmp_path / "out")
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(run_folder, "_exchange", lambda a, b: False)
    folder = RunFolder(out)
    staging, checkpoint = folder.start()
    assert checkpoint is None and staging.name.startswith(f"out.incomplete-{os.getpid()}-")
    assert (out / "weights.txt").read_text() == "old"  # the earlier run stays until the new one is complete
    (staging / "config.yaml").write_text("mode: unlearn\n")
    (staging / "weights.txt").write_text("new")
    folder.finish({"steps": 4})
    assert (out / "weights.txt").read_text() == "new" and json.loads((out / COMPLETION_MARKER).read_text())["steps"] == 4
    assert _leftovers(out) == []


def test_a_run_left_aside_by_a_crash_between_two_renames_is_put_back(tmp_path):
    out = tmp_path / "out"
    _finished_run(tmp_path / f"out.replaced-{os.getpid() + 1}")  # the crash came before the second rename
    RunFolder(out).start()
    assert (out / "weights.txt").read_text() == "old" and is_finished_run(out)


def test_a_failed_run_removes_its_folder_unless_it_holds_checkpoints(tmp_path):
    out = tmp_path / "out"
    folder = RunFolder(out)
    staging, _ = folder.start()
    (staging / "half-written.bin").write_text("x")
    assert folder.abandon() is None and _leftovers(out) == [] and not out.exists()

    folder = RunFolder(out)
    staging, _ = folder.start()
    (staging / "checkpoint-2").mkdir()
    (staging / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert folder.abandon() == staging and staging.is_dir()
    # a later fresh run leaves the interrupted run's checkpoints alone while it runs, and removes them
    # once it has finished (its result supersedes them)
    later = RunFolder(out)
    new_staging, checkpoint = later.start()
    assert checkpoint is None and staging.is_dir()
    (new_staging / "config.yaml").write_text("x")
    later.finish()
    assert not staging.exists() and _leftovers(out) == []


def _interrupted(out, step=2, resumable=True):
    folder = RunFolder(out)
    staging, _ = folder.start()
    ckpt = staging / f"checkpoint-{step}"
    ckpt.mkdir()
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt")[:3 if resumable else 1]:
        (ckpt / name).write_text("{}")
    folder.abandon()
    return staging


def test_resume_adopts_the_interrupted_runs_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputFolderError, match="resume_from_checkpoint=true: no interrupted run"):
        RunFolder(out).start(resume=True)
    old_staging = _interrupted(out)
    (old_staging / "checkpoint-1").mkdir()
    (old_staging / "checkpoint-1" / "trainer_state.json").write_text("{}")
    folder = RunFolder(out)
    staging, checkpoint = folder.start(resume=True)
    assert checkpoint == staging / "checkpoint-2" and checkpoint.is_dir() and not old_staging.exists()
    folder.abandon()  # interrupted again: the checkpoints are still kept
    assert checkpoint.is_dir()
    # an explicit checkpoint folder works too
    folder = RunFolder(out)
    again, explicit = folder.start(resume=str(checkpoint))
    assert explicit == again / "checkpoint-2" and explicit.is_dir()
    folder.abandon()


def test_weights_only_checkpoints_are_never_offered_and_never_removed_silently(tmp_path, caplog):
    out = tmp_path / "out"
    staging = _interrupted(out, resumable=False)
    with pytest.raises(OutputFolderError, match=r"no interrupted run .* left a resumable checkpoint"):
        RunFolder(out).start(resume=True)
    with pytest.raises(OutputFolderError, match=r"cannot be resumed exactly: it lacks optimizer.pt, scheduler.pt "
                                                r"\(it was saved with trainer.args.save_only_model=true"):
        RunFolder(out).start(resume=str(staging / "checkpoint-2"))
    with pytest.raises(OutputFolderError, match="not a checkpoint folder"):
        RunFolder(out).start(resume=str(tmp_path))
    caplog.set_level("WARNING", logger="run_folder")
    fresh = RunFolder(out)
    new_staging, _ = fresh.start()
    assert "weights-only checkpoints" in caplog.text and "cannot be resumed" in caplog.text
    assert "add trainer.args.resume_from_checkpoint" not in caplog.text
    (new_staging / "config.yaml").write_text("x")
    caplog.clear()
    fresh.finish()
    assert not staging.exists() and f"removing {staging}" in caplog.text and "checkpoints checkpoint-2" in caplog.text


def test_leftovers_of_killed_runs_are_listed_and_cleaned_on_request(tmp_path, caplog, capsys):
    import clean

    out = tmp_path / "saves" / "unlearn" / "run"
    folder = RunFolder(out)
    killed, _ = folder.start()  # a SIGKILL leaves its staging folder as it was
    (killed / "model.safetensors").write_bytes(b"x" * 2_000_000)
    folder.release()
    caplog.set_level("WARNING", logger="run_folder")
    alive = RunFolder(tmp_path / "saves" / "unlearn" / "other")
    alive_staging, _ = alive.start()  # a run still going: never listed, never removed
    assert f"{killed} is the staging folder of an interrupted run" not in caplog.text
    second = RunFolder(out)
    second.start()
    assert f"{killed} is the staging folder of an interrupted run" in caplog.text and "src/clean.py" in caplog.text
    second.abandon()

    assert clean.main([str(tmp_path / "saves")]) == 0
    listed = capsys.readouterr().out
    assert str(killed) in listed and "2.0 MB" in listed and "--yes" in listed and str(alive_staging) not in listed
    assert killed.is_dir()
    assert clean.main([str(tmp_path / "saves"), "--yes"]) == 0
    assert not killed.exists() and alive_staging.is_dir()
    assert "nothing to clean" in (clean.main([str(tmp_path / "saves")]) == 0 and capsys.readouterr().out)
    alive.abandon()
    with pytest.raises(SystemExit):
        clean.main([str(tmp_path / "absent")])


TINY = ["--config-name=unlearn.yaml", "model=tiny-random-llama", "trainer=GradDiff", "data.eval=null",
        "trainer.args.max_steps=4", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true"]


def test_sigterm_cleans_up_like_an_exception(tofu_dir, tmp_path):
    out = tmp_path / "run"
    result = run_until_signal(tmp_path, [*TINY, f"paths.tofu={tofu_dir}", f"paths.output_dir={out}"],
                              sig="SIGTERM", step=1, event="on_step_end")
    assert result.returncode != 0 and "stopped by signal SIGTERM" in result.stderr
    assert not out.exists() and _leftovers(out) == []  # the staging folder (no checkpoint yet) is gone


def test_sigkill_leaves_nothing_taken_for_a_result(tofu_dir, tmp_path):
    out = tmp_path / "run"
    result = run_until_signal(tmp_path, [*TINY, f"paths.tofu={tofu_dir}", f"paths.output_dir={out}",
                                         "trainer.args.save_strategy=steps", "trainer.args.save_steps=2"])
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.incomplete-")]
    assert not is_finished_run(staging) and (staging / "checkpoint-2" / "optimizer.pt").is_file()


def test_publish_folder_moves_a_whole_folder_or_leaves_the_first_one(tmp_path):
    from run_folder import publish_folder

    target = tmp_path / "cache"
    first, second = tmp_path / "staging1", tmp_path / "staging2"
    for staging, text in ((first, "first"), (second, "second")):
        staging.mkdir()
        (staging / "weights.txt").write_text(text)
    assert publish_folder(first, target) is True
    assert not first.exists() and (target / "weights.txt").read_text() == "first"
    # a second process finishing later: its copy goes, the published one stays as it was
    assert publish_folder(second, target) is False
    assert not second.exists() and (target / "weights.txt").read_text() == "first"
    # a target that is not a folder is an error, and the staging folder is kept
    (tmp_path / "file").write_text("user data")
    third = tmp_path / "staging3"
    third.mkdir()
    (third / "x").write_text("x")
    with pytest.raises(OSError):
        publish_folder(third, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "user data" and third.is_dir()
