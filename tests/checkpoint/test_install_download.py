"""``install_download``: a download is installed only if it is the checkpoint the store announced.

A store names a version by its manifest (the fsspec stores read it first) or by the manifest's
hash (W&B keeps it in the artifact's metadata). If the version is replaced while it downloads,
the files that arrive can form a complete, self-consistent checkpoint of another step: every
checksum passes, and only the comparison with the announced manifest catches it.
"""

from __future__ import annotations

import shutil

import pytest

from dylora_moe.checkpoint.format import MANIFEST_NAME, hash_file, read_manifest, verify_checkpoint
from dylora_moe.checkpoint.stores.download import install_download
from dylora_moe.errors import CheckpointError


def copy_of(source):
    def fill(staging):
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return fill


def announced(how, ckpt):
    if how == "manifest":
        return {"expected": read_manifest(ckpt)}
    return {"manifest_sha256": hash_file(ckpt / MANIFEST_NAME)[0]}


@pytest.mark.parametrize("how", ["manifest", "manifest_sha256"])
def test_the_announced_checkpoint_is_installed(ckpts, tmp_path, how):
    step10 = ckpts[1](10)
    dest = install_download(tmp_path / "dl" / "v0", copy_of(step10), "store:v0", **announced(how, step10))
    assert verify_checkpoint(dest).global_step == 10
    # and a later download of the same version reuses it
    assert install_download(dest, copy_of(step10), "store:v0", **announced(how, step10)) == dest


@pytest.mark.parametrize("how", ["manifest", "manifest_sha256"])
def test_a_version_replaced_during_the_download_is_refused(ckpts, tmp_path, how):
    step10, step20 = ckpts[1](10), ckpts[1](20)
    assert verify_checkpoint(step20).global_step == 20  # the replacement is itself intact
    dest = tmp_path / "dl" / "v0"
    with pytest.raises(CheckpointError, match="not the one the store announced"):
        install_download(dest, copy_of(step20), "store:v0", **announced(how, step10))
    assert not dest.exists()
    assert list((tmp_path / "dl").iterdir()) == []  # no staging directory left behind


def test_an_existing_download_of_another_checkpoint_is_not_reused(ckpts, tmp_path):
    step10, step20 = ckpts[1](10), ckpts[1](20)
    dest = install_download(tmp_path / "dl" / "v0", copy_of(step20), "store:v0", **announced("manifest", step20))
    with pytest.raises(CheckpointError, match="already exists and holds something else"):
        install_download(dest, copy_of(step10), "store:v0", **announced("manifest_sha256", step10))
    assert verify_checkpoint(dest).global_step == 20
