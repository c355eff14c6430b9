"""RunDir, the one owner of a run directory: its layout, the destination refusal, the vocabulary check, whether a
run is finished, and its config, record and parameters read back as written."""
import jax
import numpy as np
import pytest
from helpers import REPO, SMALL, initial_params, trained_run_config

from tokenformer_jax import sharding
from tokenformer_jax.config import MeshConfig, load_config
from tokenformer_jax.data import DataError
from tokenformer_jax.growth import Provenance
from tokenformer_jax.run import Imported, RunDir, load_tokenizer

TEST_RUN = load_config(f"{REPO}/experiments/demo.py:test_run")


def test_layout_and_the_spellings_of_a_checkpoint(tmp_path):
  run = RunDir(tmp_path / "run")
  assert RunDir(tmp_path / "run" / "checkpoints").path == run.path == tmp_path / "run"
  assert run.step_dir(12) == tmp_path / "run" / "checkpoints" / "12"
  assert (run.config_file.name, run.metrics_file.name, run.logs_dir.name) == ("config.json", "metrics.jsonl", "logs")
  assert RunDir.grown(tmp_path, "s1").path == tmp_path / "s1_grown"
  for spec, step in ((f"{tmp_path}/run", None), (f"{tmp_path}/run/7", 7), (f"{tmp_path}/run/checkpoints/7/", 7)):
    parsed, parsed_step = RunDir.parse(spec)
    assert (parsed.path, parsed_step) == (run.path, step)
  assert not run.finished(0) and not run.has_checkpoints() and not run.is_training_run()


def test_create_refuses_a_file_a_non_empty_directory_and_the_source(tmp_path):
  (tmp_path / "file").write_text("x")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "something").write_text("x")
  for dst, source, phrase in ((tmp_path / "file", None, "is a file"), (tmp_path / "full", None, "is not empty"),
                              (tmp_path / "full" / "inside", tmp_path / "full", "overlaps the source")):
    with pytest.raises(ValueError, match=phrase) as refused:
      RunDir.create(dst, overwrite=False, source=source)
    assert "\n" not in str(refused.value)
  assert RunDir.create(tmp_path / "full", overwrite=True).path == tmp_path / "full"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]   # nothing written by a refusal or create


def test_the_vocabulary_check_is_one_line_for_a_trained_and_a_new_run():
  wrong = TEST_RUN.replace(model=TEST_RUN.model.replace(vocab_size=300))
  assert load_tokenizer(TEST_RUN).vocab_size == 2048
  for trained, advice in ((True, "use the tokenizer it was trained with"), (False, "--set model.vocab_size=2048")):
    with pytest.raises(DataError) as mismatch:
      load_tokenizer(wrong, trained=trained)
    message = str(mismatch.value)
    assert "has 2048 pieces" in message and "300" in message and advice in message and "\n" not in message


def test_a_written_run_reads_back_its_config_record_and_parameters(tmp_path):
  """What cli.import_neox and cli.grow write (a params-only checkpoint at step 0, with a typed record), read back."""
  cfg = TEST_RUN.replace(model=SMALL, mesh=MeshConfig(data=2))
  params = initial_params(SMALL)
  imported = Imported(imported_from="/somewhere/pytorch_model.bin", neox_config={"hidden_size": 32})
  grown = Provenance(source="/runs/small", source_step=8, init="zero_keys", scale="keep", old_noise=0.0, seed=1,
                     old_model=SMALL.replace(name="smaller"), new_model=SMALL, optimizer="reset")
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
  for name, record in (("imported", imported), ("grown", grown), ("plain", None)):
    RunDir.create(tmp_path / name, overwrite=False).write_checkpoint(params=params, config=cfg, record=record)
    with RunDir(tmp_path / name) as run:
      assert run.finished(0) and not run.finished(1) and run.step() == 0
      assert run.config() == cfg and run.record() == record
      assert run.provenance() == (record if name == "grown" else None)
      restored = run.params(cfg.model, mesh, cfg.mesh.preset)
      jax.tree.map(np.testing.assert_array_equal, restored, params)
      assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(restored))
  with pytest.raises(ValueError, match="is not empty"):
    RunDir.create(tmp_path / "plain", overwrite=False)
  RunDir(tmp_path / "plain").write_config(cfg)
  assert RunDir(tmp_path / "plain").written_config() == cfg


@pytest.mark.slow
def test_a_trained_run(trained_run):
  run = RunDir(trained_run)
  assert run.is_training_run() and run.finished(12) and not run.finished(13) and run.step() == 12
  assert run.config() == run.written_config() == trained_run_config()
  assert run.record() is None and run.tokenizer().vocab_size == 2048
  metrics = run.metrics()
  assert sorted(metrics["train/loss"]) == list(range(1, 13)) and sorted(metrics["eval/loss"]) == [6, 12]
  run.close()
