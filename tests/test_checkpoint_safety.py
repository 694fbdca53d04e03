"""A checkpoint file that only pickle can read is never unpickled unverified (issue 10,
line 9): a DeepSpeed ``*.pt`` swapped for a same-size file whose unpickling runs code is
refused by its checksum — also at ``checkpoint.verify: size`` — before anything loads it,
and a cached universal conversion is loaded only while its own manifest matches."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ck
from trainer.files import sha256_file, write_json_atomic


class Touch:
    """Unpickling this creates ``path``: the stand-in for code an attacker would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _checkpoint_with_tampered_pickle(root: Path, marker: Path) -> Path:
    """A committed checkpoint whose manifest describes one pickle and whose disk holds
    another of the same size (only the marker's last letter differs)."""
    d = root / "checkpoints" / ck.step_dir_name(10)
    (d / "zero").mkdir(parents=True)
    pt = d / "zero" / "mp_rank_00_model_states.pt"
    (d / ck.TRAINER_STATE).write_text('{"step": 10}')
    torch.save(Touch(marker.with_name("a")), pt)  # what was written and hashed
    files = {
        str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in ck.list_files(d)
    }
    write_json_atomic(d / ck.MANIFEST, {"step": 10, "world_size": 1, "files": files})
    torch.save(Touch(marker), pt)  # swapped afterwards: same size, other bytes
    assert pt.stat().st_size == files["zero/mp_rank_00_model_states.pt"]["size"]
    return d


@pytest.mark.parametrize("level", ["checksum", "size"])
def test_a_tampered_pickle_is_refused_before_it_is_unpickled(tmp_path, level):
    marker = tmp_path / "b"
    d = _checkpoint_with_tampered_pickle(tmp_path, marker)
    problems = ck.verify(d, level)
    assert problems == [f"{d.name}/zero/mp_rank_00_model_states.pt: checksum mismatch (corrupted)"]
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint"):
        ck.resolve_resume(tmp_path, "auto", level, warn=lambda m: None)
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.resolve_resume(tmp_path, str(d), level)
    assert not marker.exists()  # nothing was unpickled
    # the test can fail: loading the file as DeepSpeed does would have run the code
    torch.load(d / "zero" / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


def test_size_level_still_skips_hashing_files_read_without_pickle(tmp_path):
    d = _checkpoint_with_tampered_pickle(tmp_path, tmp_path / "b")
    state = d / ck.TRAINER_STATE
    state.write_text(state.read_text().replace("10", "99"))  # JSON: same size, other bytes
    (d / "zero" / "mp_rank_00_model_states.pt").unlink()
    problems = ck.verify(d, "size")
    assert problems == [f"{d.name}/zero/mp_rank_00_model_states.pt: missing"]  # JSON not hashed
    assert ck.needs_pickle("zero/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not ck.needs_pickle("ddp/state.pt")  # torch.load(weights_only=True)
    assert not ck.needs_pickle("rng/rank_00000.json")


def test_a_cached_universal_conversion_is_reconverted_when_it_does_not_match(tmp_path, monkeypatch):
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    conversions = []

    def fake_convert(src: Path, out: Path) -> None:
        conversions.append(src)
        (out / "zero").mkdir(parents=True, exist_ok=True)
        (out / "zero" / "optimizer_state.pt").write_bytes(pickle.dumps({"step": 1}))
        (out / "DONE").write_text("ok\n")

    import trainer.universal

    monkeypatch.setattr(trainer.universal, "convert_to_universal", fake_convert)
    out = ck.ensure_universal(ckpt)
    assert len(conversions) == 1 and ck.verify(out) == []
    ck.ensure_universal(ckpt)
    assert len(conversions) == 1  # cached and matching: reused
    f = out / "zero" / "optimizer_state.pt"
    f.write_bytes(pickle.dumps({"step": 2}))  # same size, other bytes
    ck.ensure_universal(ckpt)
    assert len(conversions) == 2 and ck.verify(out) == []  # converted again, not loaded
