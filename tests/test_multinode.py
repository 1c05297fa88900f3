"""Two "nodes" on this machine over loopback (DeepSpeed's --hostfile with --no_ssh and
--node_rank, one rank per node, the way scripts/multinode/ launches without ssh) give the
same training as one node with two ranks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from helpers import ROOT, deepspeed_cmd, run_cli, write_ds_config
from lbllm.utils import free_port, read_jsonl

DS = str(Path(sys.executable).parent / "deepspeed")


def test_two_loopback_nodes_equal_one_node_with_two_ranks(tiny_data, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json", zero_optimization={"stage": 2})
    common = ["pretrain_bert.py", "--deepspeed_config", cfg, "--data_dir", tiny_data / "shards_64",
              "--model_config", "tiny", "--seed", "3", "--dropout", "0", "--max_steps", "3"]
    run_cli(*deepspeed_cmd(2), *common, "--output_dir", tmp_path / "one_node")

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never contacts them
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [DS, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", port, *common, "--output_dir", tmp_path / "two_nodes"]
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "world 2" in outputs[0]  # the start-up line: micro x accum x world

    one, two = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one_node", "two_nodes"))
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert abs(b["loss"] - a["loss"]) <= 1e-5 * abs(a["loss"])
    wa = torch.load(tmp_path / "one_node" / "phase_state.pt")["weights"]
    wb = torch.load(tmp_path / "two_nodes" / "phase_state.pt")["weights"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wb[k], wa[k], rtol=1e-5, atol=1e-7), k
