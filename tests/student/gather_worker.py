"""Run under 2 processes by test_multiprocess.py: the coupled loss with targets gathered across ranks must equal,
averaged over ranks, the loss of one process holding the whole batch, and each rank's InfoNCE must see the
micro-batch of every rank as keys."""

import json
import sys


def main(out_path: str) -> None:
    import torch
    from accelerate import Accelerator

    from student.loss import coupled_loss

    acc = Accelerator(cpu=True)
    gen = torch.Generator().manual_seed(0)
    batch = 3 * acc.num_processes
    pred = {"depth": {5: torch.randn(batch, 4, 6, generator=gen)}}
    target = {"depth": torch.randn(batch, 4, 6, generator=gen).half()}
    valid = {"depth": torch.tensor([True, False, True] * acc.num_processes)}
    scales = {"depth_5": torch.tensor(2.0)}
    mine = slice(3 * acc.process_index, 3 * acc.process_index + 3)
    _, local = coupled_loss(None, {"depth": {5: pred["depth"][5][mine]}}, {"depth": target["depth"][mine]},
                            {"depth": valid["depth"][mine]}, scales, gather=acc.gather)
    per_rank = acc.gather(torch.stack([local["depth_5/infonce"], local["depth_5/smooth_l1"]])[None]).cpu()
    # Predictions orthogonal to every target give all-equal logits: InfoNCE = log(number of keys) exactly.
    onehot = torch.eye(batch + 1)
    _, counted = coupled_loss(None, {"depth": {5: onehot[-1:].expand(3, 1, -1)}}, {"depth": onehot[:batch][mine, None]},
                              {"depth": torch.ones(3, dtype=torch.bool)}, {"depth_5": torch.tensor(0.0)},
                              gather=acc.gather)
    keys_seen = acc.gather(counted["depth_5/infonce"].exp()[None]).cpu()
    if acc.is_main_process:
        _, whole = coupled_loss(None, pred, target, valid, scales)
        with open(out_path, "w") as f:
            json.dump({"world": acc.num_processes, "per_rank": per_rank.tolist(), "keys_seen": keys_seen.tolist(),
                       "whole": [float(whole["depth_5/infonce"]), float(whole["depth_5/smooth_l1"])]}, f)
    # Leave together and close the group: a rank exiting while gloo's threads still run aborts with
    # "terminate called without an active exception" (SIGABRT), about one run in three on 2 cores.
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
