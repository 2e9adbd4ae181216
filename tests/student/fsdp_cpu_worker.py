"""`pipeline` commands sharded by accelerate's FSDP on CPU processes (gloo), for test_fsdp.py on machines without GPUs.

accelerate turns `distributed_type: FSDP` into FSDP only on accelerator devices: `AcceleratorState` selects it inside
its MULTI_GPU / MULTI_XPU / ... branch, so CPU processes (MULTI_CPU) get DDP whatever the config says. torch's FSDP2
(`fully_shard`) itself shards over gloo. This worker sets the state accelerate sets on GPUs (distributed type FSDP,
the plugin read from the launcher's FSDP_* variables); the trainer's own Accelerator then shares that state, and the
rest is the real CLI: accelerate's FSDP2 wrapping, sharded save_state / load_state, the gathered final save.

Command lines separated by `--then` run one after the other in the same two processes (a launch costs each rank a
fresh import of torch and transformers, most of a short run's time):

    accelerate launch --config_file manifests/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/student/fsdp_cpu_worker.py train --config X.yaml --then train --config X.yaml --set train.resume=...
"""

import sys

SEPARATOR = "--then"


def main(argv: list[str]) -> int:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from pipeline.cli import main as cli

    Accelerator(cpu=True, mixed_precision="no")  # forms the gloo group, as the trainer's Accelerator would
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        code = cli(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
