"""`dylora train` under real `torchrun` processes (gloo on CPU): DDP, FSDP, signals, exact and elastic resume.

Every run here is a real launcher with real worker processes, on the small random Llama and the
built-in dataset. `DYLORA_TRACE_EXAMPLES` records which training examples each optimizer step
consumed on each rank, so the sample order can be compared across world sizes. The first tests
check Ranks' whole state in one process: what several ranks gather must be what one process holds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dylora_moe.checkpoint.directory import list_checkpoints
from dylora_moe.checkpoint.format import read_manifest, verify_checkpoint
from dylora_moe.checkpoint.stores import open_store
from dylora_moe.errors import EXIT_PREEMPTED
from dylora_moe.train.example_trace import read_trace
from tests.conftest import REPO_ROOT, free_port

STEPS = 12


def train_argv(model_dir: str, out: Path, run_id: str, *extra: str) -> list[str]:
    return ["train", "--model_name", model_dir, "--output_dir", str(out), "--run_id", run_id, "--report_to", "none",
            "--progress", "false", "--training_subset", "8", "--max_seq_length", "64", "--train_batch_size", "4",
            "--eval_batch_size", "8", "--lora_dropout", "0.1", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--eval_steps", "4", "--save_steps", "4", "--max_steps", str(STEPS), "--disable_early_stopping", *extra]


def environment(trace: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("DYLORA_TRACE_EXAMPLES", None)
    if trace is not None:
        env["DYLORA_TRACE_EXAMPLES"] = str(trace)
    return env


def launch(nproc: int, argv: list[str], trace: Path | None = None) -> subprocess.Popen:
    """`torchrun --nproc_per_node N -m dylora_moe ARGV` (one process without a launcher when N is 0)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port())] if nproc else [sys.executable])
    return subprocess.Popen([*launcher, "-m", "dylora_moe", *argv], cwd=REPO_ROOT, env=environment(trace),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(nproc: int, argv: list[str], trace: Path | None = None, status: int = 0) -> str:
    proc = launch(nproc, argv, trace)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == status, out
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "dylora_model.safetensors"))


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [row["train/lm_loss"] for row in rows if "train/lm_loss" in row]


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes (read from their environment)."""
    workers = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if ranks:
            workers[int(ranks[0])] = int(child)
    return workers


def one_step_mixture(model_dir: str):
    """A small mixture (shared expert too) and its AdamW after one optimizer step."""
    from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
    from dylora_moe.model.base import load_base_model

    torch.manual_seed(0)
    model = DyLoRAMoE(load_base_model(model_dir), DyLoRAConfig(num_experts=3, r=2, shared_experts=1))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 100, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as train_step leaves it
    return model, optimizer


def test_the_whole_state_of_one_process_is_its_own_state_in_the_checkpoint_layout(small_model_dir):
    from dylora_moe.train.checkpoint_payload import trainable_weights
    from dylora_moe.train.distributed import Ranks

    model, optimizer = one_step_mixture(small_model_dir)
    ranks, own = Ranks(), model.trainable_state_dict()
    weights = trainable_weights(model, ranks)  # layer by layer: the tied output embedding is never gathered
    assert weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own)
    whole, saved = ranks.full_optimizer_state(model, optimizer), optimizer.state_dict()
    assert whole["param_groups"] == saved["param_groups"] and list(whole["state"]) == list(saved["state"])
    assert all(torch.equal(whole["state"][i][k], saved["state"][i][k])
               for i in saved["state"] for k in saved["state"][i])

    fresh = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    ranks.load_optimizer_state(model, fresh, whole)
    loaded = fresh.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]  # tuples (betas) stay tuples
    assert all(torch.equal(loaded["state"][i][k], saved["state"][i][k])
               for i in saved["state"] for k in saved["state"][i])


def test_an_optimizer_without_state_is_passed_through_untouched(small_model_dir):
    from dylora_moe.train.distributed import Ranks

    model, _ = one_step_mixture(small_model_dir)
    fresh = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    empty = Ranks().full_optimizer_state(model, fresh)
    assert empty["state"] == {} and not fresh.state  # no step was taken to create moments
    Ranks().load_optimizer_state(model, torch.optim.AdamW(model.trainable_parameters(), lr=1e-2), empty)
    assert all(torch.equal(a, b) for a, b in zip(before, model.trainable_parameters()))


@pytest.fixture(scope="module")
def uninterrupted(small_model_dir, tmp_path_factory):
    """A 2-rank run of STEPS steps, the reference for the others."""
    out = tmp_path_factory.mktemp("dist")
    log = run(2, train_argv(small_model_dir, out, "full"), trace=out / "trace-full")
    return out, log


@pytest.mark.slow
def test_two_ranks_train_with_rank_0_alone_writing_and_publishing(uninterrupted):
    out, log = uninterrupted
    run_dir = out / "full"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 2 * 4 and summary["steps"] == STEPS
    assert log.count("done: held-out loss") == 1  # one rank reports
    # the store has exactly one version per save (steps 4, 8, 12), every one complete
    versions = open_store(str(run_dir / "store")).list_versions()
    assert sorted(v.step for v in versions) == [4, 8, 12]
    for step, path in list_checkpoints(run_dir / "checkpoints"):
        manifest = verify_checkpoint(path)
        assert manifest.data_state["world_size"] == 2 and manifest.data_state["micro_batches_per_step"] == 2
        assert len(json.loads((path / "rng_ranks.json").read_text())) == 2  # every rank's RNG states
    # the trace: each step's global batch is 2 micro-batches of 4 (the epoch's last may be short), one per rank
    trace = read_trace(out / "trace-full")
    assert sorted(trace) == list(range(1, STEPS + 1)) and all(4 < len(ids) <= 8 for ids in trace.values())


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_the_resume_is_bit_identical(
        uninterrupted, small_model_dir):
    out, _ = uninterrupted
    argv = train_argv(small_model_dir, out, "cut", "--resume", "auto")
    launcher = launch(2, argv)
    first = out / "cut" / "checkpoints" / "step-00000004"
    while not first.exists() and launcher.poll() is None:
        time.sleep(0.05)
    workers = worker_pids(launcher)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGTERM)  # a spot preemption reaching one VM first
    log, _ = launcher.communicate(timeout=120)
    stopped = re.findall(r"stopped by SIGTERM \(received by rank 1 of 2\) at step (\d+):", log)
    assert len(stopped) == 2 and len(set(stopped)) == 1, log  # both ranks stop, at the same step
    step = int(stopped[0])
    assert 4 <= step < STEPS
    # torchrun reports the workers' status 75 (it stops the others as soon as one exits, and a rank that
    # already stopped ignores that); its own ChildFailedError report is the only traceback
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", log)
    assert codes and set(codes) == {str(EXIT_PREEMPTED)}, log
    assert log.count("Traceback") == 1 and "ChildFailedError" in log.split("Traceback")[1]
    assert verify_checkpoint(out / "cut" / "checkpoints" / f"step-{step:08d}").global_step == step
    latest = json.loads((out / "cut" / "store" / "aliases" / "latest.json").read_text())
    assert latest["step"] == step  # rank 0 published the preemption checkpoint

    run(2, argv)  # the same command continues
    a, b = final_weights(out / "full"), final_weights(out / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(out / "full") == train_losses(out / "cut")


@pytest.mark.slow
def test_evaluation_over_two_ranks_equals_one_process(uninterrupted, small_model_dir, tmp_path):
    out, _ = uninterrupted
    run(0, train_argv(small_model_dir, tmp_path, "one", "--max_steps", "1", "--save_steps", "0"))
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["eval_loss_base"]
    two = json.loads((out / "full" / "summary.json").read_text())["eval_loss_base"]
    assert one == pytest.approx(two, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_elastic_resume_keeps_the_global_batch_and_the_order_of_the_examples(
        uninterrupted, small_model_dir, tmp_path, first, then):
    out, _ = uninterrupted
    reference = read_trace(out / "trace-full")  # 2 ranks x 1 accumulation
    accumulation = 2 // first
    argv = train_argv(small_model_dir, tmp_path, "elastic", "--gradient_accumulation_steps", str(accumulation))
    run(first if first > 1 else 0, [*argv, "--max_steps", "4"], trace=tmp_path / "trace")
    log = run(then if then > 1 else 0, [*argv, "--resume", "auto"], trace=tmp_path / "trace")
    assert f"saved by {first} rank(s) x {accumulation} accumulation, continued on {then} rank(s) x " \
           f"{2 // then} accumulation" in log
    trace = read_trace(tmp_path / "trace")
    assert sorted(trace) == list(range(1, STEPS + 1))
    assert trace == reference  # every step, before and after the resume, saw the same examples
    summary = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert summary["world_size"] == then and summary["global_batch"] == 8 and summary["steps"] == STEPS
    newest = list_checkpoints(tmp_path / "elastic" / "checkpoints")[-1][1]
    assert read_manifest(newest).data_state["micro_batches_per_step"] == 2


@pytest.mark.slow
def test_a_global_batch_the_new_world_size_cannot_reproduce_is_refused_before_training(small_model_dir, tmp_path):
    argv = train_argv(small_model_dir, tmp_path, "odd", "--gradient_accumulation_steps", "3")
    run(0, [*argv, "--max_steps", "4"])  # one rank x 3 micro-batches per step
    saved = list_checkpoints(tmp_path / "odd" / "checkpoints")
    log = run(2, [*argv, "--resume", "auto"], status=1)
    assert "global batch of 3 micro-batches per optimizer step" in log and "2 ranks cannot reproduce" in log
    assert "a number of ranks that divides 3 (e.g. 1, 3)" in log
    assert log.count("dylora train: error:") == 2  # each rank says it in one paragraph
    assert list_checkpoints(tmp_path / "odd" / "checkpoints") == saved
    for _, path in saved:
        verify_checkpoint(path)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_its_checkpoints_resume_in_one_process(uninterrupted, small_model_dir, tmp_path):
    out, _ = uninterrupted
    log = run(2, train_argv(small_model_dir, tmp_path, "fsdp", "--fsdp"), trace=tmp_path / "trace")
    assert "FSDP: 2 decoder layers sharded over 2 ranks" in log
    assert read_trace(tmp_path / "trace") == read_trace(out / "trace-full")
    ddp, fsdp = final_weights(out / "full"), final_weights(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()
    for name in ddp:  # the same training, sharded: equal up to the order of floating-point sums
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-6)

    # a checkpoint written from shards holds the same files and whole tensors as one written by DDP
    step8 = Path("checkpoints") / "step-00000008"
    for name in ("dylora_model.safetensors", "optimizer.pt"):
        a = torch.load(out / "full" / step8 / name, weights_only=True) if name.endswith(".pt") else \
            load_file(str(out / "full" / step8 / name))
        b = torch.load(tmp_path / "fsdp" / step8 / name, weights_only=True) if name.endswith(".pt") else \
            load_file(str(tmp_path / "fsdp" / step8 / name))
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys()
        assert all(getattr(flat_a[k], "shape", None) == getattr(flat_b[k], "shape", None) for k in flat_a)
    assert read_manifest(tmp_path / "fsdp" / step8).fingerprint == read_manifest(out / "full" / step8).fingerprint

    # a sharded run resumed from its step-8 checkpoint, sharded again, ends bit-identical to the run that went on
    run(2, train_argv(small_model_dir, tmp_path, "fsdp-resumed", "--fsdp", "--resume", str(tmp_path / "fsdp" / step8)))
    a, b = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "fsdp-resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "fsdp-resumed")[-4:] == train_losses(tmp_path / "fsdp")[-4:]

    # ... and resumes in one process, without FSDP, with the accumulation recomputed: the same examples
    # at steps 9-12 (dropout now draws both micro-batches from one RNG, so the weights are not bit-equal)
    log = run(0, train_argv(small_model_dir, tmp_path, "one", "--resume", str(tmp_path / "fsdp" / step8)),
              trace=tmp_path / "trace-one")
    assert "saved by 2 rank(s) x 1 accumulation, continued on 1 rank(s) x 2 accumulation" in log
    reference = read_trace(out / "trace-full")
    assert read_trace(tmp_path / "trace-one") == {step: reference[step] for step in range(9, STEPS + 1)}
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    full = json.loads((out / "full" / "summary.json").read_text())
    assert one["steps"] == STEPS and one["world_size"] == 1
    assert one["eval_loss_final"] == pytest.approx(full["eval_loss_final"], rel=1e-2)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}{i}/").items()}
    return {prefix: tree}


@pytest.mark.slow
def test_the_readme_torchrun_examples_run_as_written(tmp_path):
    """Each `torchrun` line of README.md, in order, in one directory (the second continues the first on
    another number of ranks), with flags appended that make it a few steps on the shipped model."""
    import re
    import shlex

    text = (REPO_ROOT / "README.md").read_text()
    lines = [line.split("  #")[0].strip() for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
             for line in block.splitlines() if line.startswith("torchrun ")]
    assert len(lines) == 3 and "--fsdp" in lines[2] and "--resume auto" in lines[1]
    for line in lines:
        argv = shlex.split(line)
        argv[0:1] = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port",
                     str(free_port())]
        steps = "4" if "--resume" in argv else "2"
        short = ["--max_steps", steps, "--max_seq_length", "64", "--training_subset", "5", "--eval_steps", "0",
                 "--save_steps", "2", "--progress", "false", "--report_to", "none"]
        done = subprocess.run([*argv, *short], cwd=tmp_path, env=environment(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
    multi = json.loads((tmp_path / "runs" / "multi" / "summary.json").read_text())
    assert multi["world_size"] == 4 and multi["steps"] == 4 and multi["global_batch"] == 4 * 8
    sharded = json.loads((tmp_path / "runs" / "sharded" / "summary.json").read_text())
    assert sharded["world_size"] == 2 and sharded["steps"] == 2
