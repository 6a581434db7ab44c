"""The mu2net CLI as a user runs it: evolve on an npz task, then report."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import digits_splits

TINY_ARGS = ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32", "--num-heads", "2",
             "--generations", "1", "--children", "2", "--cycles", "1", "--sample-cap", "128", "--batch-size", "32",
             "--quiet", "--root-hparam", "flip=false"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mu2net.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_evolve_then_report(tmp_path):
    s = digits_splits()
    np.savez(tmp_path / "d.npz", x_train=s["train"][0], y_train=s["train"][1], x_test=s["test"][0],
             y_test=s["test"][1])
    data = str(tmp_path / "store")
    proc = _cli("evolve", "--data-dir", data, "--task", f"d={tmp_path / 'd.npz'}", "--private", "d",
                "--iterations", "1", *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = _cli("report", "--data-dir", data, "--json")
    assert rep.returncode == 0, rep.stderr[-2000:]
    doc = json.loads(rep.stdout)
    # the root's publish, then each improvement of d (its first answer and later generations)
    assert doc["system_version"] >= 2 and f"system version {doc['system_version']};" in proc.stdout
    (task,) = doc["tasks"]
    assert task["task"] == "d" and task["private"] and task["iterations_done"] == 1
    assert 0 <= task["test_accuracy"] <= 1 and task["transformer_blocks"] >= 1
    assert task["knowledge_transfer"] == {"d": 100.0}
    assert task["parent_tasks"] == [] and task["shares_components_of"] == []  # the only task
    assert doc["pool"]["total_params"] > 0
    # a second run continues the same store: one more task iteration
    proc = _cli("evolve", "--data-dir", data, "--iterations", "2", *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(_cli("report", "--data-dir", data, "--json").stdout)["tasks"][0]["iterations_done"] == 2
    # report --verify checks the store: ok, then a damaged array file is named and exits 1
    ok = _cli("report", "--data-dir", data, "--verify")
    assert ok.returncode == 0 and "store check: ok" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    from mu2net.store import Store

    with Store(data) as store:
        comp = store.get_components([store.best_path("d").component_ids[-1]])[0]
    f = tmp_path / "store" / "arrays" / comp.params_digest[:2] / f"{comp.params_digest}.npz"
    f.write_bytes(b"not the array")
    bad = _cli("report", "--data-dir", data, "--verify", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["problems"] == [
        f"component {comp.id}: array file {comp.params_digest} does not match its digest"]


def test_children_trained_in_parallel_on_cpu_devices_match_one_device(tmp_path):
    """--cpu-devices 2 trains the two children of a generation at once, one per CPU device,
    and publishes exactly what one device training them in turn publishes."""
    s = digits_splits()
    np.savez(tmp_path / "d.npz", x_train=s["train"][0], y_train=s["train"][1], x_test=s["test"][0],
             y_test=s["test"][1])
    reports = {}
    for devices in ("1", "2"):
        data = str(tmp_path / f"store{devices}")
        proc = _cli("evolve", "--data-dir", data, "--task", f"d={tmp_path / 'd.npz'}", "--iterations", "1",
                    "--cpu-devices", devices, *TINY_ARGS)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"training children on {devices} device(s)" in proc.stderr, proc.stderr[-3000:]
        (task,) = json.loads(_cli("report", "--data-dir", data, "--json").stdout)["tasks"]
        reports[devices] = {k: task[k] for k in ("validation_accuracy", "test_accuracy", "hparams",
                                                  "transformer_blocks", "trainable_params")}
    assert reports["1"] == reports["2"]
    proc = _cli("evolve", "--data-dir", str(tmp_path / "s"), "--cpu-devices", "0", *TINY_ARGS)
    assert proc.returncode == 2 and "argument --cpu-devices: 0; allowed: a positive count" in proc.stderr


def test_bad_source_and_missing_store_are_clear_errors(tmp_path):
    proc = _cli("evolve", "--data-dir", str(tmp_path / "s"), "--task", "x=builtin:imagenet", *TINY_ARGS)
    assert proc.returncode == 2 and "unknown built-in dataset 'imagenet'" in proc.stderr
    proc = _cli("report", "--data-dir", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a mu2net store" in proc.stderr


def test_serve_defaults_a_new_random_root_to_blocks_and_a_long_first_child(tmp_path):
    from mu2net import cli
    from mu2net.store import Store

    tiny = ["--image-size", "8", "--patch-size", "4", "--width", "16", "--mlp-dim", "32", "--num-heads", "2"]
    parser = cli.build_parser()
    for command, blocks, epochs, hparams in (
            ("serve", cli.SERVE_ROOT_BLOCKS, cli.SERVE_FIRST_ANSWER_EPOCHS, cli.SERVE_ROOT_HPARAMS),
            ("evolve", 0, 0.0, {})):
        args = parser.parse_args([command, "--data-dir", str(tmp_path / command), *tiny])
        store = Store(args.data_dir)
        cli.ensure_root(store, args, serving=command == "serve")
        root = store.root_path()
        assert root.architecture.num_blocks == blocks
        from mu2net import hparams as H

        assert root.hparams == {**H.DEFAULTS, **hparams}  # Table 1's defaults under serve's root values
        args.preempt = command == "serve"  # as the serving evolver process sets it
        cfg = cli.evolver_config(args)
        assert cfg.first_answer_epochs == epochs and cfg.first_answer_max_samples == 400_000
        store.close()
    # the user's flags win over serve's defaults
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path / "own"), *tiny, "--root-blocks", "1",
                              "--root-hparam", "learning_rate=0.01", "--first-answer-epochs", "2.5",
                              "--first-answer-max-samples", "1000"])
    store = Store(args.data_dir)
    cli.ensure_root(store, args, serving=True)
    assert store.root_path().architecture.num_blocks == 1 and store.root_path().hparams["learning_rate"] == 0.01
    args.preempt = True
    cfg = cli.evolver_config(args)
    assert cfg.first_answer_epochs == 2.5 and cfg.first_answer_max_samples == 1000
    store.close()
    # the early-stopping options reach the evolver process's command line and its config, the paper's preset too
    for preset in ([], ["--paper-preset"]):
        args = parser.parse_args(["serve", "--data-dir", str(tmp_path / "own"), "--long-patience", "3",
                                  "--generation-patience", "2", *preset])
        argv = cli.evolver_argv(args)
        assert argv[argv.index("--long-patience") + 1] == "3" and argv[argv.index("--generation-patience") + 1] == "2"
        cfg = cli.evolver_config(args)
        assert (cfg.long_patience, cfg.generation_patience) == (3, 2)
        assert cfg.children == (8 if preset else 4)
    for flag, value, allowed in (("--first-answer-epochs", "-1", "a finite number >= 0"),
                                 ("--first-answer-epochs", "nan", "a finite number >= 0"),
                                 ("--first-answer-max-samples", "0", "an integer >= 1"),
                                 ("--root-blocks", "-2", "an integer >= 0")):
        proc = _cli("serve", "--data-dir", str(tmp_path / "bad"), flag, value)
        assert proc.returncode == 2 and flag in proc.stderr and allowed in proc.stderr, proc.stderr
