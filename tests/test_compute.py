"""The cost record (src/core/compute.py): the FLOPs estimate by hand, phases, the combination of several
processes' measures, and the records a real unlearning run and a real evaluation under attack write into
run_complete.json and the EVAL files' ``_meta.compute``. Times are only checked to be positive."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import MODEL_CACHE, REPO, train_in_process
from core import compute
from core.compute import (
    MEMORY_HOST,
    CostRecorder,
    Phase,
    PhaseCost,
    _Local,
    add_tokens,
    combine,
    flop_params,
    forward_flops,
    mask_tokens,
    sum_totals,
    tokens_unknown,
    training_flops,
)


class _TiedLM(torch.nn.Module):
    """An embedding table (10 x 4), a hidden layer (4 -> 4 with bias) and an output layer tied to the table."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_flops_estimate_computed_by_hand():
    # untied: the embedding table (40) is a lookup and left out; the linear layer counts 4 * 3 + 3 = 15
    untied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    assert flop_params(untied) == 15
    # tied: the shared table counts once, as the output projection: 16 + 4 + 40 = 60
    assert flop_params(_TiedLM()) == 60
    # 6 N T and 2 N T: 6 * 15 * 100 = 9000, 2 * 15 * 100 = 3000
    assert training_flops(15, 100) == 9000.0
    assert forward_flops(15, 100) == 3000.0


def test_mask_tokens_sums_every_attention_mask_of_a_nested_batch():
    batch = {"forget": {"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
             "retain": {"attention_mask": torch.tensor([[1, 0, 0]]), "labels": torch.zeros(1, 3)},
             "index": [0, 1]}
    assert int(mask_tokens(batch)) == 6
    assert mask_tokens({"input_ids": torch.ones(1, 2)}) is None


def test_phases_nest_count_tokens_and_keep_their_order():
    model = torch.nn.Linear(4, 3)  # N = 15
    with CostRecorder() as cost:
        with Phase("training", "training"):
            add_tokens(model, 10, backward=True)
            add_tokens(model, torch.tensor(5), backward=True)  # a device value: read when the phase ends
            with Phase("evaluation:X@step1", "evaluation") as inner:
                add_tokens(model, 7)
                time.sleep(0.01)
        with Phase("evaluation:X", "evaluation") as final:
            tokens_unknown("cannot count here")
            add_tokens(model, 3)
        run = cost.finish(params=flop_params(model))
    training, at_step, last = run.phases
    assert [p.name for p in run.phases] == ["training", "evaluation:X@step1", "evaluation:X"]  # start order
    assert (training.parent, at_step.parent, last.parent) == (None, "training", None)
    assert inner.record == at_step and final.record == last
    assert at_step.tokens == 7 and at_step.flops == forward_flops(15, 7)
    # the training phase includes the evaluation inside it
    assert training.tokens == 22 and training.flops == training_flops(15, 15) + forward_flops(15, 7)
    assert (last.tokens, last.flops, last.tokens_note) == (None, None, "cannot count here")
    assert run.total.tokens is None  # the run's total cannot be exact either
    assert at_step.wall_s > 0 and training.wall_s >= at_step.wall_s and run.total.wall_s >= training.wall_s
    for record in (*run.phases, run.total):
        assert record.process_s >= 0 and record.processes == 1 and record.devices == 1
        assert record.device_hours == pytest.approx(record.wall_s / 3600)
        assert record.memory_kind == MEMORY_HOST and record.peak_memory_bytes["rank0:cpu"] > 0
        assert PhaseCost.from_json(json.loads(json.dumps(record.as_json()))) == record
    assert run.params == 15 and run.resumed_from is None and run.note is None
    assert not compute._OPEN and not compute._RECORDERS
    add_tokens(model, 1)  # outside any phase: nothing to count, no error


def test_a_failed_phase_records_nothing_and_a_failed_run_leaves_nothing_open():
    with pytest.raises(RuntimeError):
        with CostRecorder() as cost:
            with Phase("evaluation:X", "evaluation"):
                pass
            with Phase("attack:quant4:X", "attack"):
                with Phase("evaluation:X", "evaluation"):
                    raise RuntimeError("failed")
    assert [p.name for p in cost.records()] == ["evaluation:X"]
    assert not compute._OPEN and not compute._RECORDERS


def test_the_processes_measures_are_combined():
    """Two processes: the longest wall time, process time and tokens summed, each process's devices."""
    cuda = [_Local(0, 10.0, 8.0, "cuda_max_allocated", {"cuda:0": 100}, 1000, 6e6, None),
            _Local(1, 12.0, 9.0, "cuda_max_allocated", {"cuda:1": 300}, 500, 3e6, None)]
    merged = combine("training", "training", None, cuda)
    assert (merged.wall_s, merged.process_s, merged.processes, merged.devices) == (12.0, 17.0, 2, 2)
    assert merged.device_hours == pytest.approx(2 * 12.0 / 3600)
    assert merged.peak_memory_bytes == {"rank0:cuda:0": 100, "rank1:cuda:1": 300} and merged.peak_bytes == 300
    assert (merged.tokens, merged.flops, merged.tokens_note) == (1500, 9e6, None)
    unknown = combine("evaluation:LMEval", "evaluation", None,
                      [cuda[0], _Local(1, 1.0, 1.0, "cuda_max_allocated", {"cuda:1": 5}, None, None, "lm-eval")])
    assert (unknown.tokens, unknown.flops, unknown.tokens_note) == (None, None, "lm-eval")
    cpu = combine("setup", "setup", None, [_Local(r, 1.0, 1.0, MEMORY_HOST, {"cpu": 7}, 0, 0.0, None) for r in (0, 1)])
    assert cpu.devices == 2 and cpu.peak_memory_bytes == {"rank0:cpu": 7, "rank1:cpu": 7}


def _total(wall, tokens, flops, peak, kind=MEMORY_HOST):
    return combine("run", "run", None, [_Local(0, wall, wall / 2, kind, {"cpu": peak}, tokens, flops, None)]).as_json()


def test_sweep_sum_of_totals():
    totals = [_total(3600.0, 100, 600.0, 5), None, _total(1800.0, 50, 300.0, 9)]
    summed = sum_totals(totals)
    assert summed["runs_counted"] == 2 and summed["runs_without_record"] == 1
    assert summed["wall_s"] == 5400.0 and summed["process_s"] == 2700.0 and summed["device_hours"] == 1.5
    assert (summed["tokens"], summed["flops"]) == (150, 900.0)
    assert summed["peak_memory_bytes"] == {"cuda_max_allocated": None, "host_max_rss": 9}
    unknown = combine("run", "run", None, [_Local(0, 1.0, 1.0, MEMORY_HOST, {"cpu": 1}, None, None, "x")]).as_json()
    assert sum_totals([totals[0], unknown])["tokens"] is None
    assert sum_totals([])["runs_counted"] == 0


# ----- real runs -----------------------------------------------------------------------------------------
SHORT_TOFU = ["eval.tofu.limit=4", "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
              *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
                for p in ("retain", "ra", "wf")]]


def _check_positive(record: dict) -> None:
    assert record["wall_s"] > 0 and record["process_s"] > 0 and record["device_hours"] > 0, record["name"]
    assert record["devices"] == 1 and record["processes"] == 1
    assert all(v > 0 for v in record["peak_memory_bytes"].values()) and record["peak_memory_bytes"]


def test_an_unlearning_run_records_its_cost(tofu_dir, tmp_path, monkeypatch):
    """A 2-step GradDiff run evaluated at step 2 and at the end: setup, training (with the step-2 evaluation
    inside), the final evaluation; tokens counted, FLOPs by the formula, the EVAL files' _meta.compute."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    train_in_process(out, [
        "model=tiny-random-llama", "trainer=GradDiff", f"paths.tofu={tofu_dir}", "eval=tofu", "data.eval=null",
        "trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=1",
        "trainer.args.disable_tqdm=true", "trainer.args.report_to=none", *SHORT_TOFU])
    cost = json.loads((out / "run_complete.json").read_text())["compute"]
    phases = {p["name"]: p for p in cost["phases"]}
    assert list(phases) == ["setup", "training", "evaluation:TOFU@step1", "evaluation:TOFU@step2"]
    assert cost["resumed_from"] is None and cost["note"] is None
    n = cost["params"]
    assert n > 0
    training, total = phases["training"], cost["total"]
    inside = [phases["evaluation:TOFU@step1"], phases["evaluation:TOFU@step2"]]
    for record in [*phases.values(), total]:
        _check_positive(record)
    assert phases["setup"]["tokens"] == 0 and phases["setup"]["flops"] == 0
    for evaluation in inside:
        assert evaluation["parent"] == "training" and evaluation["tokens"] > 0
        assert evaluation["flops"] == forward_flops(n, evaluation["tokens"])  # forward passes only
    # the training phase: its own batches at 6 N per token, plus the evaluations inside it
    own = training["tokens"] - sum(e["tokens"] for e in inside)
    assert own > 0 and training["flops"] == pytest.approx(training_flops(n, own) + sum(e["flops"] for e in inside))
    assert total["tokens"] == training["tokens"] and total["flops"] == pytest.approx(training["flops"])
    assert total["wall_s"] >= training["wall_s"] + phases["setup"]["wall_s"]
    # 2 steps x (2 forget + 2 retain rows): the attention masks of what the trainer consumed
    assert 4 * 2 * 4 <= own <= 4 * 2 * 512
    # the result is the step-2 evaluation (the last step): its EVAL file carries that phase
    meta = json.loads((out / "evals" / "TOFU_EVAL.json").read_text())["_meta"]
    assert meta["compute"] == [phases["evaluation:TOFU@step2"]]


def test_an_evaluation_under_attack_records_each_phase(tofu_dir, tmp_path, monkeypatch):
    """eval.py with the quantization and relearning attacks: setup, the evaluation, one phase per attack, in
    run_complete.json and in the EVAL file's _meta.compute (which the golden comparison leaves out)."""
    from hydra import compose, initialize_config_dir

    import eval as eval_script
    from golden_workloads import STABLE_META

    monkeypatch.chdir(REPO)
    out = tmp_path / "eval"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=[
            "model=tiny-random-llama", f"paths.tofu={tofu_dir}", f"paths.output_dir={out}",
            f"paths.model_cache_dir={MODEL_CACHE}", "attack=[quantize,relearn]", "attack.quantize.group_size=32",
            "attack.relearn.steps=2", "attack.relearn.batch_size=2", *SHORT_TOFU])
    results = eval_script.run(cfg)
    cost = json.loads((out / "run_complete.json").read_text())["compute"]
    names = [p["name"] for p in cost["phases"]]
    assert names == ["setup", "evaluation:TOFU", "attack:quant4:TOFU", "attack:relearn:TOFU"]
    phases = dict(zip(names, cost["phases"]))
    n = cost["params"]
    for record in [*cost["phases"], cost["total"]]:
        _check_positive(record)
        assert record["parent"] is None
    evaluation, relearn = phases["evaluation:TOFU"], phases["attack:relearn:TOFU"]
    assert evaluation["tokens"] > 0 and evaluation["flops"] == forward_flops(n, evaluation["tokens"])
    # the quantized copy has the same shapes: the same N
    quant = phases["attack:quant4:TOFU"]
    assert quant["tokens"] > 0 and quant["flops"] == forward_flops(n, quant["tokens"])
    # relearning: training passes (6 N per token) before the evaluation of the relearned copy (2 N)
    assert relearn["flops"] > forward_flops(n, relearn["tokens"])
    assert cost["total"]["tokens"] == sum(p["tokens"] for p in cost["phases"])
    meta = json.loads((out / "TOFU_EVAL.json").read_text())["_meta"]
    assert meta["compute"] == [evaluation, quant, relearn]
    assert results["tofu"].meta["compute"] == meta["compute"]
    assert "compute" not in STABLE_META  # the golden files compare results, not costs


def test_the_sweep_summary_sums_its_jobs_costs(tmp_path):
    """sweep_summary.json: each job's record with its run's cost, and the costs summed."""
    from sweep import sweep_summary

    records = []
    for job, (status, total) in enumerate([("finished", _total(60.0, 10, 60.0, 3)), ("failed", None),
                                           ("finished", _total(120.0, 20, 120.0, 4)), ("finished", None)]):
        out = tmp_path / f"job{job}"
        out.mkdir()
        if total is not None:
            (out / "run_complete.json").write_text(json.dumps({"mode": "unlearn", "compute": {"total": total}}))
        records.append({"job": job, "status": status, "output_dir": str(out)})
    summary = sweep_summary(list(reversed(records)))
    assert [j["job"] for j in summary["jobs"]] == [0, 1, 2, 3]
    assert [j["compute"] is not None for j in summary["jobs"]] == [True, False, True, False]
    spent = summary["compute"]
    assert (spent["runs_counted"], spent["runs_without_record"]) == (2, 2)
    assert (spent["wall_s"], spent["tokens"], spent["flops"]) == (180.0, 30, 180.0)
    assert spent["device_hours"] == pytest.approx(180.0 / 3600)


def test_the_report_shows_each_runs_cost(tmp_path):
    """Cost columns (wall time, device-hours, peak memory, tokens, FLOPs) from run_complete.json's compute.total;
    n/a for a run written before runs recorded their cost."""
    import reporting
    from test_report import eval_config, write_tofu_eval

    summary = {"forget_Q_A_Prob": 0.5, "model_utility": 0.6}
    for name, total in (("new", _total(7200.0, 1000, 6e9, 2**30)), ("old", None)):
        folder = tmp_path / name
        write_tofu_eval(folder, summary, ["a", "b", "c"], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], model=name)
        (folder / "config.yaml").write_text(json.dumps(eval_config(name, name)))
        marker = {"mode": "eval"} if total is None else {"mode": "eval", "compute": {"total": total}}
        (folder / "run_complete.json").write_text(json.dumps(marker))
    columns, rows = reporting.build_table(reporting.find_runs([tmp_path]))
    labels = [c.label for c in columns if c.kind == "cost"]
    assert labels == ["wall (s)", "device-hours", "peak memory (GiB)", "tokens", "FLOPs"]
    by_name = {row["name"]: row for row in rows}
    assert [by_name["new"][c.key] for c in columns if c.kind == "cost"] == [7200.0, 2.0, 1.0, 1000, 6e9]
    assert all(by_name["old"][c.key] is None for c in columns if c.kind == "cost")
    report_file = reporting.make_report([tmp_path], out=tmp_path / "report")
    assert "device-hours" in report_file.read_text() and "6e+09" in (tmp_path / "report" / "report.md").read_text()
    # without any recorded cost, no cost columns
    (tmp_path / "new" / "run_complete.json").write_text(json.dumps({"mode": "eval"}))
    columns, _ = reporting.build_table(reporting.find_runs([tmp_path]))
    assert not [c for c in columns if c.kind == "cost"]
