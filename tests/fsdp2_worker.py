"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): our FSDP2 code paths on a model
sharded with torch's own ``fully_shard`` (accelerate enables FSDP on GPUs only, so the Trainer cannot be
driven sharded here). Writes ``<argv[1]>/rank<r>.json`` per process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))  # synthetic_tofu (the generated data)

from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from core.distributed import gather_dicts, is_fsdp2_module, rank_shard  # noqa: E402
from data.collators import DataCollatorForSupervisedDataset  # noqa: E402
from trainer.reference_cache import ReferenceNLLCache  # noqa: E402
from trainer.utils import hidden_states_at  # noqa: E402


class _Pad:
    pad_token_id = 0


def _tofu_summary(model, tokenizer, tofu: Path, out: Path) -> dict:
    """The whole TOFU evaluation (first 5 rows of each set, short generations) of ``model``."""
    from hydra import compose, initialize_config_dir

    from evals import get_evaluators
    from resolvers import register_resolvers

    register_resolvers()
    repo = Path(__file__).resolve().parents[1]
    short = [f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
             for p in ("retain", "ra", "wf")]
    with initialize_config_dir(config_dir=str(repo / "configs"), version_base=None):
        cfg = compose("eval.yaml", overrides=["eval=tofu", f"paths.tofu={tofu}", "holdout_split=holdout01",
                                               "eval.tofu.limit=5", f"paths.output_dir={out}",
                                               "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
                                               *short])
    evaluator = get_evaluators(cfg.eval, tokenizer=tokenizer, template_args=cfg.model.get("template_args"),
                               paths=cfg.paths)["tofu"]
    return evaluator.evaluate(model, output_dir=str(out), model_id="fsdp2-check").summary


def _evaluation_passes(folder: Path) -> dict:
    """The evaluator's plain passes (teacher-forced statistics, greedy generation) on 5 questions over 2 processes
    (3 and 2; with batch size 2: 2 and 1 batches), on the sharded model and on the whole one."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from data import build_dataset, compose_dataset
    from evals.base import FirstRows
    from evals.passes import plain_generation_pass, plain_token_stats_pass
    from synthetic_tofu import generate_tofu_like

    tofu = folder / "tofu"
    if dist.get_rank() == 0:
        generate_tofu_like(tofu, n_authors=20, qa_per_author=4, seed=0)
    dist.barrier()
    tokenizer = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / ".cache" / "models" /
                                                  "SmolLM2-135M-Instruct"))
    dataset = FirstRows(build_dataset(compose_dataset("TOFU_QA_FORGET10", OmegaConf.create(
        {"paths": {"tofu": str(tofu)}, "seed": 0})), tokenizer), 5)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    plain = LlamaForCausalLM(config).eval()
    sharded = LlamaForCausalLM(config).eval()
    sharded.load_state_dict(plain.state_dict())
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    stats = [plain_token_stats_pass(m, dataset, tokenizer, batch_size=2) for m in (sharded, plain)]
    texts = [plain_generation_pass(m, dataset, tokenizer, batch_size=2, max_new_tokens=6) for m in (sharded, plain)]
    summaries = [_tofu_summary(m, tokenizer, tofu, folder / name) for m, name in ((sharded, "sharded"), (plain, "plain"))]
    return {
        "summary_keys": sorted(summaries[0]),
        "max_summary_diff": max(abs(summaries[0][k] - summaries[1][k]) for k in summaries[1]
                                if summaries[1][k] is not None),
        "stats_items": sorted(stats[0]), "texts_items": sorted(texts[0]),
        "max_logp_diff": max(float(abs(a.logp - b.logp).max()) for i in stats[1]
                             for a, b in zip(stats[0][i], stats[1][i], strict=True)),
        "same_generations": all(texts[0][i]["generation"] == texts[1][i]["generation"] for i in texts[1]),
    }


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    plain = LlamaForCausalLM(config).eval()
    sharded = LlamaForCausalLM(config).eval()
    sharded.load_state_dict(plain.state_dict())
    sharded.requires_grad_(False)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    # 5 samples over 2 processes: 3 and 2, so with batch size 1 the shards need 3 and 2 forward passes
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i in range(5):
        ids = torch.randint(1, 50, (4 + i,), generator=gen)
        labels = ids.clone()
        labels[:2] = -100
        samples.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    mine = [samples[i] for i in rank_shard(range(5))]
    collate = DataCollatorForSupervisedDataset(_Pad())
    count = torch.tensor(len(mine))
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    sharded_cache, plain_cache = ReferenceNLLCache(), ReferenceNLLCache()
    sharded_cache.fill(sharded, mine, collate, 1, "cpu", num_batches=int(count))  # lockstep: no hang
    plain_cache.fill(plain, samples, collate, 1, "cpu")
    values = gather_dicts(sharded_cache.values)
    ids = torch.randint(1, 50, (1, 6), generator=gen)
    with torch.no_grad():
        hidden_sharded = hidden_states_at(sharded, 0, input_ids=ids)
        hidden_plain = hidden_states_at(plain, 0, input_ids=ids)
    evaluation = _evaluation_passes(Path(sys.argv[1]))
    (Path(sys.argv[1]) / f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "rank": dist.get_rank(), "fsdp2": is_fsdp2_module(sharded), "cached": len(values),
        "max_nll_diff": max(abs(values[k] - v) for k, v in plain_cache.values.items()),
        "max_hidden_diff": float((hidden_sharded - hidden_plain).abs().max()), **evaluation,
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
