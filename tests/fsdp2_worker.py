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

from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from data.collators import DataCollatorForSupervisedDataset  # noqa: E402
from trainer.reference_cache import ReferenceNLLCache  # noqa: E402
from trainer.utils import gather_dicts, hidden_states_at, is_fsdp2_module, rank_shard  # noqa: E402


class _Pad:
    pad_token_id = 0


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
    (Path(sys.argv[1]) / f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "rank": dist.get_rank(), "fsdp2": is_fsdp2_module(sharded), "cached": len(values),
        "max_nll_diff": max(abs(values[k] - v) for k, v in plain_cache.values.items()),
        "max_hidden_diff": float((hidden_sharded - hidden_plain).abs().max()),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
