"""A passed data check is remembered against its inputs' identity (launcher/preflight.py,
issue 9 line 4): ``zerotune train`` started again on the very same config, data and model
reads nothing again (no datasets / transformers import in the launcher); any change of
them checks again, and ``zerotune validate`` always checks."""

from __future__ import annotations

import pytest

from conftest import TINY


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.tsv"
    path.write_text(
        "sentence\tlabel\n" + "".join(f"review {i} is fine\t{i % 2}\n" for i in range(300))
    )
    return path


@pytest.fixture
def reads(monkeypatch):
    """How often the data were really read (the launcher's ``_check_data``)."""
    import launcher.preflight as preflight

    calls = []
    real = preflight._check_data

    def counted(cfg, warnings):
        calls.append(cfg)
        return real(cfg, warnings)

    monkeypatch.setattr(preflight, "_check_data", counted)
    return calls


def _check(data, *sets, reuse=True):
    from launcher.preflight import check_data_into, check_settings

    pf = check_settings(str(TINY), [f"data.train={data}", "data.text_column=sentence", *sets], 2)
    return check_data_into(pf, reuse=reuse)


def test_the_same_inputs_are_checked_once_and_the_verdict_reused(data, reads):
    first = _check(data)
    assert first.problems == [] and first.train_rows == 270 and len(reads) == 1  # 10 % carved
    again = _check(data)
    assert again.problems == [] and again.train_rows == 270 and len(reads) == 1  # not read
    _check(data, reuse=False)  # zerotune validate: always reads
    assert len(reads) == 2


def test_a_changed_file_or_config_is_checked_again(data, reads):
    _check(data)
    other = _check(data, "data.max_length=20")  # another config: checked again
    assert other.problems == [] and len(reads) == 2
    with open(data, "a") as f:  # the same path, changed: a label the task cannot use
        f.write("review 300\tseven\n")
    bad = _check(data)
    assert len(reads) == 3 and any("seven" in p for p in bad.problems)
    assert _check(data).problems and len(reads) == 4  # a failed check is never remembered
    data.write_text(data.read_text().replace("seven", "1"))  # mended: checked again, passes
    assert _check(data).problems == [] and len(reads) == 5
    assert _check(data).problems == [] and len(reads) == 5  # and that pass is remembered
