"""The foundation every other layer stands on: shards, their index, images, target stores, the training loader,
config loading and the errors users see.

Nothing here imports `teachers`, `student` or the jobs in `pipeline/` (tests/test_layers.py checks it), so a
store or a shard can be read without torch models or Ray in the process.
"""
