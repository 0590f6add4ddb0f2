#!/usr/bin/env python3
"""Ray tasks: one `effir encode` shard per task on a Ray cluster sharing a
file system, then the merge. A task that fails (a lost node) is retried and
resumes from the blocks its shard finished.

    python3 examples/sharded-encoding/ray_encode.py MODEL DATA OUT N
"""

import subprocess
import sys

import ray


@ray.remote(num_cpus=8, max_retries=3)
def encode(model, data, out, index, count):
    subprocess.run(
        ["effir", "encode", "--quiet", "--model", model, "--data", data,
         "--shard", f"{index}/{count}", "--out", f"{out}/shard-{index}"],
        check=True,
    )
    return f"{out}/shard-{index}"


def main():
    model, data, out, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ray.init()
    shards = ray.get([encode.remote(model, data, out, i, count) for i in range(count)])
    merge = ["effir", "eval", "--model", model, "--data", data, "--out", f"{out}/eval"]
    for shard in shards:
        merge += ["--embeddings", shard]
    subprocess.run(merge, check=True)


if __name__ == "__main__":
    main()
